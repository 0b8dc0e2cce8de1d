"""What the network reads per decode step and per Mamba layer, built once by Kernels (decode_meta,
ssm_params) and shared by every layer of the step."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SsmParams:
    """A Mamba layer's decode constants, prepared once at load (Kernels.ssm_params): A = -exp(A_log) and
    the (h, p[, n]) stride-0 views selective_state_update takes (None on the reference path)."""
    A: torch.Tensor  # (h,) fp32
    D: torch.Tensor  # (h,)
    dt_bias: torch.Tensor  # (h,)
    A_e: torch.Tensor | None = None  # (h, p, n)
    D_e: torch.Tensor | None = None  # (h, p)
    bias_e: torch.Tensor | None = None  # (h, p)
    zero_bias_e: torch.Tensor | None = None  # (h, p) fp32 zeros: dt discretized here when dt_limit is set


@dataclass
class DecodeMeta:
    """Per decode step, built once (Kernels.decode_meta) and shared by every layer."""
    slots: torch.Tensor | slice  # (B,) long when a fused state kernel runs, else long or a slice
    block_tables: torch.Tensor  # (B, mb) long KV block ids; entries past a row's length are not read
    positions: torch.Tensor  # (B,) long: tokens cached before this step (the new token's index)
    kv_index: torch.Tensor  # (B,) long: flat KV row (block * block_size + offset) the new token goes to
    runs: tuple[tuple[int, int], ...] = ()  # the slots as (first, count) runs (host ints; reference path)
    conv_slots: torch.Tensor | slice | None = None  # the slots for conv_decode: int32 when its kernel is fused
