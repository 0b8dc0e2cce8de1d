"""Batched token sampling with per-slot parameters, state kept on the device (model/runtime/runner.py owns one).

Processing order (the same as Hugging Face `generate` and TGI):
  0. logits processors (model/types.py LogitsProcessor, e.g. a grammar): the rows that have one lose the
     tokens their mask disallows (-inf), so everything below, logprobs included, sees the masked distribution,
  1. repetition penalty over prompt + generated ids (HF/CTRL: divide positive logits, multiply negative),
  2. frequency / presence penalty over generated ids only (OpenAI: logit -= count * f + (count > 0) * p),
  3. greedy rows: argmax of the penalised logits,
     sampled rows: temperature -> top-k -> top-p -> typical-p, then one draw from the row's own
     torch.Generator (so a seeded request gets the same tokens whatever its batch-mates are).
Logprobs (chosen token and top-n alternatives) are log_softmax of the *processed* distribution,
as TGI reports them: penalised logits for greedy rows; penalised, temperature-scaled and filtered
logits for sampled rows (filtered tokens have logprob -inf and are never reported as alternatives).

Per step everything is batched: each processor runs once on the rows that use it (row indices come from
host-side per-slot parameters, so no device sync), the penalty masks / counts are (slots, V) tensors updated
in place by the sampled tokens, and the result is one packed tensor for the step's single device-to-host
copy. The only per-row op left is the noise draw of sampled rows: each row's own generator (seed parity).

A step is split in two around the forward (model/runtime/runner.py launch): `fill` runs the logits processors on the
host (their masks into a preallocated buffer, copied to the device without blocking) while the device runs
the forward, then `sample` applies them and samples. Without a processor in the step `fill` returns None at
once and `sample` runs the same ops as without the hook.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model.types import LogitsProcessor, SamplingParams, SeqChunk, StepOutput, resolve_seed

NEG_INF = float("-inf")
PLAIN = SamplingParams()  # greedy, no penalties, no alternatives


# ---- processors on (n, V) float32 logits; each returns a new tensor -------------------------------


def apply_repetition_penalty(x: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    # x: (n, V); seen: (n, V) bool; penalty: (n,)
    pen = penalty[:, None]
    return torch.where(seen, torch.where(x < 0, x * pen, x / pen), x)


def apply_openai_penalties(x: torch.Tensor, counts: torch.Tensor, freq: torch.Tensor, pres: torch.Tensor):
    # counts: (n, V) float occurrences in the generated ids; freq, pres: (n,)
    return x - counts * freq[:, None] - (counts > 0).to(x.dtype) * pres[:, None]


def apply_top_k(x: torch.Tensor, k: torch.Tensor, k_max: int | None = None) -> torch.Tensor:
    # k: (n,) long in [1, V]; keeps every token tied with the k-th largest (as HF does). k_max = max(k),
    # given by a caller that knows it on the host (no device sync).
    kth = torch.topk(x, int(k.max()) if k_max is None else k_max, dim=-1).values.gather(1, (k - 1)[:, None])
    return x.masked_fill(x < kth, NEG_INF)


def apply_top_p(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    # p: (n,) in (0, 1]; drops the least likely tokens whose cumulative mass is <= 1 - p, keeps >= 1
    sorted_x, order = torch.sort(x, dim=-1, descending=False)
    cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1 - p)[:, None]
    drop[:, -1] = False
    return x.masked_fill(drop.scatter(1, order, drop), NEG_INF)


def apply_typical(x: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    # Locally typical sampling (Meister et al.): keep the tokens whose surprisal is closest to the
    # entropy until `mass` is covered. mass: (n,) in (0, 1).
    logp = torch.log_softmax(x, dim=-1)
    ent = -(logp * logp.exp()).nansum(-1, keepdim=True)
    shifted = (-logp - ent).abs()
    sorted_shifted, order = torch.sort(shifted, dim=-1, descending=False)
    cum = x.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cum < mass[:, None]).sum(dim=1).clamp_(max=x.shape[-1] - 1)
    drop = sorted_shifted > sorted_shifted.gather(1, last[:, None])
    drop[:, :1] = False
    return x.masked_fill(drop.scatter(1, order, drop), NEG_INF)


@dataclass(frozen=True)
class RowMask:
    """A step's logits-processor masks on the device (Sampler.fill): banned (B, V) bool, one row per batch row
    (all False for the rows without a processor), so applying it is one op (masked_fill) whatever the mix."""

    banned: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(B, V) float32 logits -> a new tensor, the disallowed tokens at -inf (the free rows unchanged)."""
        return x.masked_fill(self.banned, NEG_INF)


class _MaskBuffers:
    """Sampler.fill's preallocated buffers: allowed (slots, V) bool that the processors write and its negation
    banned, on the host (pinned on CUDA), and banned on the device (the same tensor on a CPU device)."""

    def __init__(self, slots: int, vocab: int, device: torch.device) -> None:
        pin = device.type == "cuda"
        self.allowed = torch.empty(slots, vocab, dtype=torch.bool)
        self.banned = torch.empty(slots, vocab, dtype=torch.bool, pin_memory=pin)
        # numpy views of the same host memory for the whole-buffer work: one thread, no intra-op pool to wake
        # (torch's took ~8 ms for a (64, 4096) fill on the loaded 2-core VM, numpy microseconds)
        self._allowed_np, self._banned_np = self.allowed.numpy(), self.banned.numpy()
        self.copy = device.type != "cpu"
        self.banned_dev = torch.empty_like(self.banned, device=device) if self.copy else self.banned

    def fill(self, rows: list[int], chunks: Sequence[SeqChunk], processors: dict[int, LogitsProcessor]) -> RowMask:
        n = len(chunks)
        allowed = self.allowed[:n]
        self._allowed_np[:n] = True
        batched: dict[type, list[int]] = {}  # processors that fill many rows at once (fill_rows), by type
        for j in rows:
            p = processors[chunks[j].slot]
            if hasattr(type(p), "fill_rows"):
                batched.setdefault(type(p), []).append(j)
            else:
                p.fill(allowed[j], chunks[j])
        for kind, js in batched.items():
            kind.fill_rows([processors[chunks[j].slot] for j in js], self._allowed_np, js, [chunks[j] for j in js])
        np.logical_not(self._allowed_np[:n], out=self._banned_np[:n])  # on the host: no device op
        out = self.banned_dev[:n]
        if self.copy:
            out.copy_(self.banned[:n], non_blocking=True)
        return RowMask(out)


# ---- the sampler ----------------------------------------------------------------------------------


class Sampler:
    def __init__(self, num_slots: int, vocab: int, device) -> None:
        self.vocab, self.device = vocab, torch.device(device)
        self.params: list[SamplingParams] = [PLAIN] * num_slots
        self.generators: list[torch.Generator | None] = [None] * num_slots
        self.special: set[int] = set()  # slots with anything but plain greedy processing
        self.top_n: dict[int, int] = {}  # slots that want alternatives -> how many
        self.seen: torch.Tensor | None = None  # (slots, V) bool: prompt + generated ids; built on first use
        self.counts: torch.Tensor | None = None  # (slots, V) float32: generated ids
        self.processors: dict[int, LogitsProcessor] = {}  # slots with a logits processor
        self._masks: _MaskBuffers | None = None  # fill()'s buffers, made by the first open() with a processor

    def open(self, slot: int, params: SamplingParams, seed: int | None, context_ids: Sequence[int],
             processor: LogitsProcessor | None = None) -> None:
        """Bind `slot` to a new sequence: its parameters, generator, penalty state (context_ids: the
        prompt the repetition penalty covers) and logits processor (None: none)."""
        self.params[slot] = params
        if processor is None:
            self.processors.pop(slot, None)
        else:
            self.processors[slot] = processor
            if self._masks is None:  # fill()'s buffers, made with the first processor (outside any step)
                self._masks = _MaskBuffers(len(self.params), self.vocab, self.device)
        self.generators[slot] = None
        if not params.greedy:
            g = torch.Generator(device=self.device)
            g.manual_seed(resolve_seed(params) if seed is None else seed)
            self.generators[slot] = g
        plain = params.greedy and params.repetition_penalty == 1.0 and not (
            params.frequency_penalty or params.presence_penalty)
        (self.special.discard if plain else self.special.add)(slot)
        if params.top_n_tokens > 0:
            self.top_n[slot] = params.top_n_tokens
        else:
            self.top_n.pop(slot, None)
        if params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
            if self.seen is None:
                n = len(self.params)
                self.seen = torch.zeros(n, self.vocab, dtype=torch.bool, device=self.device)
                self.counts = torch.zeros(n, self.vocab, dtype=torch.float32, device=self.device)
            self.seen[slot] = False
            self.counts[slot] = 0
            if context_ids:
                self.seen[slot, torch.tensor(list(context_ids), dtype=torch.long, device=self.device)] = True

    def _index(self, rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _values(self, values: list, dtype=torch.float32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def fill(self, chunks: Sequence[SeqChunk]) -> RowMask | None:
        """The host half of the logits processors, between the step's forward launch and its sampling:
        chunks are the step's rows (its chunks with want_logits, in order). Each row with a processor fills
        its row of a preallocated host mask (the other rows stay all True: one apply op for the whole batch; a
        processor type with a `fill_rows` classmethod fills all its rows in one call, e.g. a grammar's
        parallel mask computation); the mask goes to the device without blocking (a pinned buffer on CUDA: a
        plain torch.tensor(..., device=) copy would wait for the stream, that is for the forward). One step in flight: the runner's collect() syncs past these copies before
        the next fill reuses the buffers. None, with no work at all, when no row has a processor."""
        if not self.processors:
            return None
        rows = [j for j, c in enumerate(chunks) if c.slot in self.processors]
        if not rows:
            return None
        return self._masks.fill(rows, chunks, self.processors)

    def process(self, logits: torch.Tensor, slots: Sequence[int],
                mask: RowMask | None = None) -> tuple[torch.Tensor, list[int]]:
        """Apply every row's processors to (B, V) logits, row j of slot slots[j], the logits processors'
        masks (fill) first. Returns the processed float32 logits and the rows that are sampled (not greedy)."""
        x = logits.float()
        if mask is not None:
            x = mask.apply(x)
        if self.special.isdisjoint(slots):
            return x, []
        ps = [self.params[s] for s in slots]
        rep = [j for j, p in enumerate(ps) if p.repetition_penalty != 1.0]
        if rep:
            idx, sl = self._index(rep), self._index([slots[j] for j in rep])
            x = x.clone()
            x[idx] = apply_repetition_penalty(x[idx], self.seen[sl],
                                              self._values([ps[j].repetition_penalty for j in rep]))
        oai = [j for j, p in enumerate(ps) if p.frequency_penalty != 0 or p.presence_penalty != 0]
        if oai:
            idx, sl = self._index(oai), self._index([slots[j] for j in oai])
            x = x.clone()
            x[idx] = apply_openai_penalties(x[idx], self.counts[sl], self._values([ps[j].frequency_penalty for j in oai]),
                                            self._values([ps[j].presence_penalty for j in oai]))
        sampled = [j for j, p in enumerate(ps) if not p.greedy]
        if not sampled:
            return x, []
        sub = [ps[j] for j in sampled]
        idx = self._index(sampled)
        y = x[idx] / self._values([p.temperature for p in sub])[:, None]
        V = x.shape[-1]
        sel = [j for j, p in enumerate(sub) if p.top_k > 0]
        if sel:
            s, ks = self._index(sel), [min(sub[j].top_k, V) for j in sel]
            y[s] = apply_top_k(y[s], self._values(ks, torch.long), max(ks))
        sel = [j for j, p in enumerate(sub) if p.top_p < 1.0]
        if sel:
            s = self._index(sel)
            y[s] = apply_top_p(y[s], self._values([sub[j].top_p for j in sel]))
        sel = [j for j, p in enumerate(sub) if p.typical_p < 1.0]
        if sel:
            s = self._index(sel)
            y[s] = apply_typical(y[s], self._values([sub[j].typical_p for j in sel]))
        x = x.clone() if x is logits else x
        x[idx] = y
        return x, sampled

    def sample(self, logits: torch.Tensor, slots: Sequence[int], mask: RowMask | None = None) -> torch.Tensor:
        """(B, V) logits -> (B, 2 + 2 n) float64 on the device: token id, its logprob, then the n best
        logprobs and their ids (n = the most alternatives any row wants). Updates the penalty state.
        mask: this step's logits-processor masks (fill), None when no row has a processor."""
        if logits.shape[0] != len(slots):
            raise ValueError(f"{logits.shape[0]} logit rows for {len(slots)} slots")
        x, sampled = self.process(logits, slots, mask)
        logp = torch.log_softmax(x, dim=-1)  # (B, V)
        tokens = x.max(dim=-1).indices  # greedy rows (first maximum, as argmax; faster on CPU); sampled: below
        if sampled:
            idx = self._index(sampled)
            probs = logp[idx].exp()
            noise = torch.empty_like(probs)
            for j, row in enumerate(sampled):
                # Exponential race (= Gumbel-max): argmax(p / E), E ~ Exp(1) from the row's own generator.
                noise[j].exponential_(generator=self.generators[slots[row]])
            tokens[idx] = (probs / noise).argmax(dim=-1)
        chosen = logp.gather(1, tokens[:, None])
        cols = [tokens[:, None].double(), chosen.double()]
        n_top = max((self.top_n.get(s, 0) for s in slots), default=0) if self.top_n else 0
        if n_top > 0:
            vals, ids = torch.topk(logp, min(n_top, logp.shape[-1]), dim=-1)
            cols += [vals.double(), ids.double()]
        if self.seen is not None:
            self.record(self._index(list(slots)), tokens)
        return torch.cat(cols, dim=1)

    def record(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Fold sampled tokens (B,) of slots (B,) (distinct) into the penalty state."""
        if self.seen is not None:
            self.seen[slots, tokens] = True
            self.counts[slots, tokens] += 1

    def unpack(self, packed: list[list[float]], slots: Sequence[int]) -> StepOutput:
        """The host copy of sample()'s result (as lists) -> StepOutput."""
        tokens = [int(r[0]) for r in packed]
        logprobs = [r[1] for r in packed]
        top: list[list[tuple[int, float]]] = [[] for _ in slots]
        if packed and len(packed[0]) > 2:
            n_top = (len(packed[0]) - 2) // 2
            for i, (s, r) in enumerate(zip(slots, packed, strict=True)):
                n = self.top_n.get(s, 0)
                top[i] = [(int(t), v) for v, t in zip(r[2:2 + n], r[2 + n_top:2 + n_top + n], strict=True)
                          if v != NEG_INF]
        return StepOutput(tokens, logprobs, top)

    def sample_to_host(self, logits: torch.Tensor, slots: Sequence[int]) -> StepOutput:
        return self.unpack(self.sample(logits, slots).tolist(), slots)
