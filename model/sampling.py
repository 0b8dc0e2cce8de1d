"""Batched token sampling with per-row parameters.

Processing order (the same as Hugging Face `generate` and TGI):
  1. repetition penalty over prompt + generated ids (HF/CTRL: divide positive logits, multiply negative),
  2. frequency / presence penalty over generated ids only (OpenAI: logit -= count * f + (count > 0) * p),
  3. greedy rows: argmax of the penalised logits,
     sampled rows: temperature -> top-k -> top-p -> typical-p, then one draw from the row's own
     torch.Generator (so a seeded request gets the same tokens whatever its batch-mates are).
Logprobs (chosen token and top-n alternatives) are log_softmax of the *processed* distribution,
as TGI reports them: penalised logits for greedy rows; penalised, temperature-scaled and filtered
logits for sampled rows (filtered tokens have logprob -inf and are never reported as alternatives).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.types import SamplingParams

NEG_INF = float("-inf")


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


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]]  # per row: up to top_n_tokens (token_id, logprob), best first


# ---- processors on (n, V) float32 logits; each returns a new tensor -------------------------------


def apply_repetition_penalty(x: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    # x: (n, V); seen: (n, V) bool; penalty: (n,)
    pen = penalty[:, None]
    return torch.where(seen, torch.where(x < 0, x * pen, x / pen), x)


def apply_openai_penalties(x: torch.Tensor, counts: torch.Tensor, freq: torch.Tensor, pres: torch.Tensor):
    # counts: (n, V) float occurrences in the generated ids; freq, pres: (n,)
    return x - counts * freq[:, None] - (counts > 0).to(x.dtype) * pres[:, None]


def apply_top_k(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    # k: (n,) long in [1, V]; keeps every token tied with the k-th largest (as HF does)
    kth = torch.topk(x, int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
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


# ---- the batch --------------------------------------------------------------------------------------


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
