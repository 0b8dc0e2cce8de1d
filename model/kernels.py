"""The ONE place that picks, per op, a fused CUDA kernel or the pure-torch reference (model/ssd.py).

Ops (shapes as in model/ssd.py):
  ssd_prefill  x (b, l, h, p) ... initial states (b, h, p, n) -> (y, final states) mamba_chunk_scan_combined
               (a packed prefill: fresh rows in one varlen call, continued rows apart, see ssd_prefill)
  ssm_decode   one token for B slots, state pool (S, h, p, n) updated in place       selective_state_update
  conv_prefill x (b, d, l) from conv states (b, d, w-1) -> (y, new states)           causal_conv1d_fn
  conv_decode  x (B, d), conv pool (S, d, w-1) updated in place                       causal_conv1d_update
  attention    SDPA (torch picks flash / memory-efficient / math itself)
Fused modules are imported lazily and only for CUDA. `report` says which path each op took.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from model import ssd
from model.packed import Packed

log = logging.getLogger(__name__)

OPS = ("ssd_prefill", "ssm_decode", "conv_prefill", "conv_decode", "attention")
# The SSD scan's result does not depend on its chunk size (only rounding does). The reference's
# intra-chunk (l, s) work per token grows with the chunk, so on CPU it scans in chunks of at most this
# (demo model: 64 -> 32 is ~1.8x faster); the fused kernel keeps the checkpoint's chunk size.
REFERENCE_CHUNK = 32


@dataclass
class FusedOps:
    mamba_chunk_scan_combined: Callable | None = None
    selective_state_update: Callable | None = None
    causal_conv1d_fn: Callable | None = None
    causal_conv1d_update: Callable | None = None
    errors: dict[str, str] | None = None


def _import_mamba_triton(name: str) -> Any:
    """Import mamba_ssm.ops.triton.<name> without running mamba_ssm/__init__.py when that fails.

    mamba_ssm/__init__ imports the compiled selective_scan_cuda; the Triton kernels don't need it.
    If the normal import fails we register a bare package module whose __path__ points at the
    installed package directory, so only the submodules themselves execute.
    """
    full = f"mamba_ssm.ops.triton.{name}"
    try:
        return importlib.import_module(full)
    except Exception:  # noqa: BLE001 - ImportError / OSError from the compiled extension
        spec = importlib.util.find_spec("mamba_ssm") if "mamba_ssm" not in sys.modules else None
        if spec is None or not spec.submodule_search_locations:
            raise
        for key in [k for k in sys.modules if k == "mamba_ssm" or k.startswith("mamba_ssm.")]:
            del sys.modules[key]  # drop the half-imported package
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec
        sys.modules["mamba_ssm"] = pkg
        return importlib.import_module(full)


def load_fused() -> FusedOps:
    ops, errors = FusedOps(), {}
    try:
        ops.mamba_chunk_scan_combined = _import_mamba_triton("ssd_combined").mamba_chunk_scan_combined
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        errors["mamba_chunk_scan_combined"] = repr(e)
    try:
        ops.selective_state_update = _import_mamba_triton("selective_state_update").selective_state_update
    except Exception as e:  # noqa: BLE001
        errors["selective_state_update"] = repr(e)
    try:
        cc = importlib.import_module("causal_conv1d")
        ops.causal_conv1d_fn, ops.causal_conv1d_update = cc.causal_conv1d_fn, cc.causal_conv1d_update
    except Exception as e:  # noqa: BLE001
        errors["causal_conv1d"] = repr(e)
    ops.errors = errors
    return ops


def _accepts(fn: Callable, arg: str) -> bool:
    try:
        return arg in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _slot_tensor(slots, device) -> torch.Tensor:
    """Decode slots as the (B,) long tensor the fused kernels index with (the reference also takes a slice)."""
    if isinstance(slots, slice):
        return torch.arange(slots.start, slots.stop, dtype=torch.long, device=device)
    return slots


class Kernels:
    def __init__(self, mode: str, device: torch.device, fused: FusedOps | None = None) -> None:
        """mode auto|fused|reference. `fused` injects kernel implementations (tests); else load_fused() on CUDA."""
        if mode not in ("auto", "fused", "reference"):
            raise ValueError(f"kernels must be auto|fused|reference, got {mode!r}")
        device = torch.device(device)
        if mode == "fused" and device.type != "cuda" and fused is None:
            raise RuntimeError("kernels='fused' needs a CUDA device (mamba-ssm / causal-conv1d); this is "
                               f"{device.type}. Use kernels='auto' or 'reference'.")
        if mode == "reference":
            fused = FusedOps()
        elif fused is None:
            fused = load_fused() if device.type == "cuda" else FusedOps()
        self.f = fused
        self.ssm_decode_indexed = fused.selective_state_update is not None and _accepts(
            fused.selective_state_update, "state_batch_indices")
        self.ssd_state_dtype_arg = fused.mamba_chunk_scan_combined is not None and _accepts(
            fused.mamba_chunk_scan_combined, "state_dtype")
        self.report = {
            "ssd_prefill": "fused:mamba_chunk_scan_combined" if fused.mamba_chunk_scan_combined else "reference",
            "ssm_decode": ("fused:selective_state_update" + ("" if self.ssm_decode_indexed else "+gather"))
            if fused.selective_state_update else "reference",
            "conv_prefill": "fused:causal_conv1d_fn" if fused.causal_conv1d_fn else "reference",
            "conv_decode": "fused:causal_conv1d_update" if fused.causal_conv1d_update else "reference",
            "attention": "sdpa",
        }
        if mode == "fused":
            missing = [op for op, path in self.report.items() if path == "reference"]
            if missing:
                raise RuntimeError(f"kernels='fused' but these fused kernels are unavailable: {missing}; "
                                   f"import errors: {fused.errors}")
        for op, path in self.report.items():
            log.info("kernel %s: %s", op, path)
        if fused.errors:
            log.info("fused kernels not loaded: %s", fused.errors)

    # ---- Mamba SSM -------------------------------------------------------------------------
    def ssd_prefill(self, x, dt, A, B, C, chunk_size, D, dt_bias, initial_states, dt_limit, pk: Packed | None = None):
        """x (b, L, h, p) ... initial_states (b, h, p, n) -> (y, final states (b, h, p, n)).

        pk None: every row is L real tokens, y (b, L, h, p). pk: the rows of a packed prefill (real tokens then
        pads, pk.lengths), y in packed order (T, h, p); its host facts (pk.scan) plan the fused calls, so
        no layer reads a tensor back.
        """
        if self.f.mamba_chunk_scan_combined is None:
            y, final = ssd.ssd_chunk_scan(x, dt, A, B, C, min(chunk_size, REFERENCE_CHUNK), D=D, dt_bias=dt_bias,
                                          initial_states=initial_states, dt_limit=dt_limit,
                                          lengths=None if pk is None else pk.lengths)
            return (y, final) if pk is None else (pk.unpad(y), final)
        if pk is None:
            return self._ssd_fused(x, dt, A, B, C, chunk_size, D, dt_bias, initial_states, dt_limit)
        rows = pk.scan
        args = (A, chunk_size, D, dt_bias, dt_limit)
        if not rows.fresh:
            return self._ssd_continued(x, dt, B, C, initial_states, rows, rows.continued, *args)
        yf, sf = self._ssd_fresh(x, dt, B, C, rows, *args)
        if not rows.continued:
            return yf, sf
        y = x.new_empty(sum(rows.lengths), *x.shape[2:])
        y.index_copy_(0, rows.fresh_packed, yf)
        finals = torch.empty(initial_states.shape, dtype=torch.float32, device=x.device)
        finals.index_copy_(0, rows.fresh_rows, sf.float())
        off = 0
        for i, n in enumerate(rows.lengths):
            if i in rows.continued:
                yi, fi = self._ssd_continued(x, dt, B, C, initial_states, rows, (i,), *args)
                y[off:off + n], finals[i] = yi, fi[0]
            off += n
        return y, finals

    def _ssd_fresh(self, x, dt, B, C, rows, A, chunk_size, D, dt_bias, dt_limit):
        """The fresh rows (zero initial state) back to back in one varlen call -> y (T_f, h, p), states (n_f, ...)."""
        if len(rows.lengths) == 1:  # one sequence: no pads, no gather
            y, final = self._ssd_fused(x, dt, A, B, C, chunk_size, D, dt_bias, None, dt_limit)
            return y[0], final
        take = lambda t: t.flatten(0, 1)[rows.fresh_tokens][None]  # noqa: E731 - (b, L, ...) -> (1, T_f, ...)
        if len(rows.fresh) == 1:
            y, final = self._ssd_fused(take(x), take(dt), A, take(B), take(C), chunk_size, D, dt_bias, None,
                                       dt_limit)
            return y[0], final
        # Varlen: seq_idx keeps each sequence's tokens and chunk states apart, cu_seqlens yields each
        # sequence's own final state (in C's dtype).
        y, states = self.f.mamba_chunk_scan_combined(
            take(x), take(dt), A, take(B), take(C), chunk_size, D=D, z=None, dt_bias=dt_bias, initial_states=None,
            seq_idx=rows.seq_idx, cu_seqlens=rows.cu_seqlens, dt_softplus=True, dt_limit=tuple(dt_limit),
            return_final_states=False, return_varlen_states=True)
        return y[0], states

    def _ssd_continued(self, x, dt, B, C, initial_states, rows, which, A, chunk_size, D, dt_bias, dt_limit):
        """Rows continuing from their states: one call for all when they fill the width, else one per row."""
        L, ns = x.shape[1], rows.lengths
        if len(which) == len(ns) and all(n == L for n in ns):
            y, final = self._ssd_fused(x, dt, A, B, C, chunk_size, D, dt_bias, initial_states, dt_limit)
            return y.flatten(0, 1), final
        ys, finals = [], []
        for i in which:
            n = ns[i]
            yi, fi = self._ssd_fused(x[i:i + 1, :n], dt[i:i + 1, :n], A, B[i:i + 1, :n], C[i:i + 1, :n],
                                     chunk_size, D, dt_bias, initial_states[i:i + 1], dt_limit)
            ys.append(yi[0])
            finals.append(fi)
        return (ys[0], finals[0]) if len(ys) == 1 else (torch.cat(ys), torch.cat(finals))

    def _ssd_fused(self, x, dt, A, B, C, chunk_size, D, dt_bias, initial_states, dt_limit):
        # mamba-ssm 2.3.2.post1 returns the final states in fp32 (the caller casts into the pool); forks with a
        # `state_dtype` argument (vLLM's) would otherwise materialise them in C's dtype.
        if self.ssd_state_dtype_arg:
            extra = {"state_dtype": torch.float32 if initial_states is None else initial_states.dtype}
        else:
            extra = {}
        y, final = self.f.mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size, D=D, z=None, dt_bias=dt_bias, initial_states=initial_states,
            dt_softplus=True, dt_limit=tuple(dt_limit), return_final_states=True, **extra)
        return y, final

    def ssm_decode(self, state_pool, slots, x, dt, A, B, C, D, dt_bias, dt_limit):
        """state_pool (S, h, p, n); slots (B,) long or a slice (a run of consecutive slots); x (B, h, p);
        dt (B, h); B, C (B, g, n). Returns y (B, h, p)."""
        if self.f.selective_state_update is None:
            return ssd.ssm_decode_inplace(state_pool, slots, x, dt, A, B, C, D, dt_bias, dt_limit)
        slots = _slot_tensor(slots, state_pool.device)
        h, p, n = state_pool.shape[1:]
        # The kernel wants per-(head, channel) parameters; expanded views with stride 0 over p let it
        # take its "tied head dim" fast path.
        if tuple(dt_limit) != ssd.NO_DT_LIMIT:  # the kernel has no clamp: discretize here
            # (a zero bias, not None: the kernel reads dt_bias.stride() unconditionally)
            dt, softplus = ssd.discretize_dt(dt, dt_bias, dt_limit), False
            dt_bias = torch.zeros_like(dt_bias, dtype=torch.float32)
        else:
            softplus = True
        dt_e = dt[:, :, None].expand(-1, h, p)
        A_e = A[:, None, None].expand(h, p, n).to(torch.float32)
        D_e = D[:, None].expand(h, p)
        bias_e = dt_bias[:, None].expand(h, p)
        if self.ssm_decode_indexed:
            return self.f.selective_state_update(
                state_pool, x, dt_e, A_e, B, C, D=D_e, z=None, dt_bias=bias_e, dt_softplus=softplus,
                state_batch_indices=slots.to(torch.int32))
        state = state_pool[slots]  # older mamba_ssm: gather, update, scatter
        y = self.f.selective_state_update(state, x, dt_e, A_e, B, C, D=D_e, z=None, dt_bias=bias_e,
                                          dt_softplus=softplus)
        state_pool.index_copy_(0, slots, state)
        return y

    # ---- causal depthwise conv ------------------------------------------------------------
    def conv_prefill(self, x, conv_state, weight, bias, lengths=None):
        """x (b, d, l); conv_state (b, d, w-1); weight (d, w); lengths (b,) long: real inputs per row (pads
        after). Returns (silu(conv) (b, d, l), new state (b, d, w-1) taken at each row's end)."""
        if self.f.causal_conv1d_fn is None:
            return ssd.causal_conv(x, conv_state, weight, bias, lengths)
        # Prepend the carried state and drop its outputs: exact, and needs no channel-last layout
        # (causal_conv1d_fn's own initial_states argument requires x with stride(1) == 1).
        w = weight.shape[-1]
        xx = torch.cat([conv_state.to(x.dtype), x], dim=-1).contiguous()
        y = self.f.causal_conv1d_fn(xx, weight, bias, activation="silu")
        return y[..., w - 1:], ssd.conv_state_at(xx, lengths, w)

    def conv_decode(self, x, conv_pool, slots, weight, bias):
        """x (B, d); conv_pool (S, d, w-1) updated in place at slots. Returns (B, d)."""
        if self.f.causal_conv1d_update is None:
            return ssd.conv_decode_inplace(x, conv_pool, slots, weight, bias)
        slots = _slot_tensor(slots, conv_pool.device)
        return self.f.causal_conv1d_update(x.contiguous(), conv_pool, weight, bias, activation="silu",
                                           conv_state_indices=slots.to(torch.int32))

    # ---- attention -------------------------------------------------------------------------
    @staticmethod
    def attention(q, k, v, mask, scale):
        """q (b, hq, lq, e); k, v (b, hkv, lk, e); mask (b|1, 1, lq, lk) bool (True = attend).

        GQA without repeating K/V: query head i reads KV head i // rep, so the rep query heads of one KV
        head become rep * lq query rows of that head: (b, hkv, rep * lq, e), mask tiled to match.
        """
        b, hq, lq, e = q.shape
        rep = hq // k.shape[1]
        if rep > 1:
            q = q.reshape(b, k.shape[1], rep * lq, e)
            mask = mask.expand(-1, -1, rep, -1) if lq == 1 else mask.repeat(1, 1, rep, 1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return o.reshape(b, hq, lq, e)  # (SDPA may return a transposed layout: not always viewable)
