"""Oracle: the sampler as it was before the batched one (model/runtime/sampling.py at commit beba698), per-row loops
and all, kept verbatim to check the new sampler gives the same tokens for the same seeds."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from model.runtime.sampling import (
    NEG_INF,
    apply_openai_penalties,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    apply_typical,
)
from model.types import SamplingParams
from model.types import StepOutput as SampleOutput


class RowState:
    """Per-sequence sampling state, kept by the engine for the sequence's lifetime."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], device: torch.device | str = "cpu"):
        self.params = params
        self.prompt_ids = prompt_ids
        self.device = torch.device(device)
        # A sampled request without a seed gets a random one, reported back (TGI `details.seed`).
        self.seed = params.seed if (params.seed is not None or params.greedy) else secrets.randbits(63)
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(self.seed)
        self._prompt_t: torch.Tensor | None = None  # prompt ids as a device tensor, built once

    def prompt_tensor(self) -> torch.Tensor:
        if self._prompt_t is None:
            self._prompt_t = torch.tensor(list(self.prompt_ids), dtype=torch.long, device=self.device)
        return self._prompt_t


def _rows(flags: list[bool], device: torch.device) -> torch.Tensor | None:
    idx = [i for i, f in enumerate(flags) if f]
    return torch.tensor(idx, dtype=torch.long, device=device) if idx else None


def _vec(values: list[float], idx: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor([values[i] for i in idx.tolist()], dtype=dtype, device=idx.device)


def process_logits(
    logits: torch.Tensor, rows: Sequence[RowState], outputs: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply every row's processors. Returns the processed (B, V) float32 logits and the indices
    of the sampled (non-greedy) rows, or None when all rows are greedy."""
    x = logits.float()
    B, V = x.shape
    dev = x.device
    params = [r.params for r in rows]

    idx = _rows([p.repetition_penalty != 1.0 for p in params], dev)
    if idx is not None:
        seen = torch.zeros(len(idx), V, dtype=torch.bool, device=dev)
        for j, i in enumerate(idx.tolist()):
            seen[j, rows[i].prompt_tensor()] = True
            if outputs[i]:
                seen[j, torch.tensor(list(outputs[i]), dtype=torch.long, device=dev)] = True
        x = x.clone()
        x[idx] = apply_repetition_penalty(x[idx], seen, _vec([p.repetition_penalty for p in params], idx))

    idx = _rows([(p.frequency_penalty != 0 or p.presence_penalty != 0) and len(o) > 0
                 for p, o in zip(params, outputs, strict=True)], dev)
    if idx is not None:
        counts = torch.stack([
            torch.bincount(torch.tensor(list(outputs[i]), dtype=torch.long, device=dev), minlength=V)[:V]
            for i in idx.tolist()
        ]).float()
        freq = _vec([p.frequency_penalty for p in params], idx)
        pres = _vec([p.presence_penalty for p in params], idx)
        x = x.clone()
        x[idx] = apply_openai_penalties(x[idx], counts, freq, pres)

    sampled = _rows([not p.greedy for p in params], dev)
    if sampled is None:
        return x, None
    sub_params = [params[i] for i in sampled.tolist()]
    y = x[sampled] / torch.tensor([p.temperature for p in sub_params], device=dev)[:, None]

    def subset(flags: list[bool], fn, values: list[float], dtype=torch.float32):
        nonlocal y
        sel = [j for j, f in enumerate(flags) if f]
        if sel:
            s = torch.tensor(sel, dtype=torch.long, device=dev)
            y[s] = fn(y[s], torch.tensor([values[j] for j in sel], dtype=dtype, device=dev))

    subset([p.top_k > 0 for p in sub_params], apply_top_k, [min(p.top_k, V) for p in sub_params], torch.long)
    subset([p.top_p < 1.0 for p in sub_params], apply_top_p, [p.top_p for p in sub_params])
    subset([p.typical_p < 1.0 for p in sub_params], apply_typical, [p.typical_p for p in sub_params])
    x = x.clone() if x is logits else x
    x[sampled] = y
    return x, sampled


def sample(logits: torch.Tensor, rows: Sequence[RowState], outputs: Sequence[Sequence[int]]) -> SampleOutput:
    """logits: (B, V) float32, one row per sequence; outputs: the ids each sequence generated so far."""
    if logits.shape[0] != len(rows) or len(rows) != len(outputs):
        raise ValueError(f"{logits.shape[0]} logit rows, {len(rows)} rows, {len(outputs)} outputs")
    x, sampled = process_logits(logits, rows, outputs)
    logp = torch.log_softmax(x, dim=-1)  # (B, V)
    tokens = x.max(dim=-1).indices  # greedy rows (first maximum, as argmax; faster on CPU); sampled: below
    if sampled is not None:
        probs = logp[sampled].exp()
        draws = []
        for j, i in enumerate(sampled.tolist()):
            # Exponential race (= Gumbel-max): argmax(p / E), E ~ Exp(1) from the row's own generator.
            noise = torch.empty_like(probs[j]).exponential_(generator=rows[i].generator)
            draws.append((probs[j] / noise).argmax())
        tokens[sampled] = torch.stack(draws)
    chosen = logp.gather(1, tokens[:, None])[:, 0]

    top: list[list[tuple[int, float]]] = [[] for _ in rows]
    n_top = max(r.params.top_n_tokens for r in rows)
    if n_top > 0:
        vals, ids = torch.topk(logp, min(n_top, logp.shape[-1]), dim=-1)
        for i, (v_row, id_row) in enumerate(zip(vals.tolist(), ids.tolist(), strict=True)):
            n = rows[i].params.top_n_tokens
            top[i] = [(t, v) for t, v in zip(id_row[:n], v_row[:n], strict=True) if v != NEG_INF]
    return SampleOutput(tokens.tolist(), chosen.tolist(), top)
