"""The ONE place that picks, per op, a fused CUDA kernel or the pure-torch reference (model/network/ssd.py).

Ops (shapes as in model/network/ssd.py):
  ssd_prefill  x (b, l, h, p) ... initial states (b, h, p, n) -> (y, final states) mamba_chunk_scan_combined
               (a packed prefill: fresh rows in one varlen call, continued rows apart, see ssd_prefill)
  ssm_decode   one token for B slots, state pool (S, h, p, n) updated in place       selective_state_update
  conv_prefill x (b, d, l) from conv states (b, d, w-1) -> (y, new states)           causal_conv1d_fn
  conv_decode  x (B, d), conv pool (S, d, w-1) updated in place                       causal_conv1d_update
  add_norm     residual + x * scale, then RMSNorm; returns both (N, hidden)            rms_norm_fn (prenorm)
  gated_norm   RMSNorm(y * silu(gate)) per group of channels (N, d)                    rmsnorm_fn (gated)
  swiglu       silu(gate) * up from [gate | up] (N, 2m) -> (N, m)                      swiglu
  prefill_attention  each chunk over its own KV, causal with the diagonal at its start, no mask tensor
               (model/network/prefill_attention.py: causal_lower_right SDPA on CUDA, a two-part merge on CPU)
  decode_attention  one query per row over its paged KV, read in place   model/network/paged_attention.py
                    (reference: gather the row's blocks + SDPA)
  linear       the projections: F.linear; on CPU oneDNN's linear when present (model/network/linear.py
               cpu_linear: faster than MKL here). A projection may add a per-row extra term to its output
               (linear.py LinearExtra, where a LoRA delta goes); without one (the default) it is this op alone
  lora         many adapters' deltas in one step, per adapter group (model/network/lora.py)  lora_triton.py
Fused modules are imported lazily and only for CUDA (tests inject them). `report` says which path each op
took. The reference formulas match Hugging Face's Granite modules in fp32 (tests/test_granite.py).
Size: ~370 lines because every op's two paths and their argument preparation sit side by side, the point
of one choosing module; what is not choosing lives beside it (linear.py, step_meta.py, ssd.py, fused_ops.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from model.network import ssd
from model.network.fused_ops import FusedOps, accepts, load_fused
from model.network.linear import cpu_linear
from model.network.lora import lora_cpu, lora_reference
from model.network.packed import Packed
from model.network.prefill_attention import causal_cpu, causal_cuda, prefill_attention
from model.network.step_meta import DecodeMeta, SsmParams

log = logging.getLogger(__name__)

OPS = ("ssd_prefill", "ssm_decode", "conv_prefill", "conv_decode", "add_norm", "gated_norm", "swiglu",
       "attention", "decode_attention")
# The SSD scan's result does not depend on its chunk size (only rounding does). The reference's
# intra-chunk (l, s) work per token grows with the chunk, so on CPU it scans in chunks of at most this
# (demo model: 64 -> 32 is ~1.8x faster); the fused kernel keeps the checkpoint's chunk size.
REFERENCE_CHUNK = 32


# Slot indices of the fused state kernels. selective_state_update adds index * slot stride (h * p * n) to
# the state pointer in the index's type: int32 wraps from 2^31 / stride slots (4,096 for the micro) onto
# other slots' states, so it gets int64. causal_conv1d_update takes int32 only (a TORCH_CHECK) and computes
# its offset in uint32 (csrc/causal_conv1d_update.cu): Kernels.check_slots refuses pools past that at start-up.
CONV_OFFSET_LIMIT = 2**32


def _slot_index(slots, dtype: torch.dtype, device) -> torch.Tensor:
    """Slots (a slice of consecutive slots or a (B,) integer tensor) as the (B,) `dtype` tensor a kernel takes."""
    if isinstance(slots, slice):
        return torch.arange(slots.start, slots.stop, dtype=dtype, device=device)
    return slots if slots.dtype == dtype else slots.to(dtype)


def _long(slots):
    """Slots for the reference ops (torch indexing / index_copy_): long or a slice."""
    return slots if isinstance(slots, slice) or slots.dtype == torch.long else slots.long()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face GraniteMoeHybridRMSNorm: statistics in fp32, weight * normed.to(x.dtype)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:  # one fused op, the same formula
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def gated_rms_norm(y, gate, weight, eps: float, groups: int) -> torch.Tensor:
    """HF GraniteMoeHybridRMSNormGated: RMSNorm(y * silu(gate)) per group of channels, in fp32."""
    yf = y.float() * F.silu(gate.float())
    yg = yf.unflatten(-1, (groups, -1))
    yg = F.rms_norm(yg, (yg.shape[-1],), None, eps)  # x * rsqrt(mean(x^2) + eps) per group, fp32
    return weight * yg.flatten(-2).to(y.dtype)


class Kernels:
    def __init__(self, mode: str, device: torch.device, fused: FusedOps | None = None) -> None:
        """mode auto|fused|reference. `fused` injects kernel implementations (tests); else load_fused() on CUDA."""
        if mode not in ("auto", "fused", "reference"):
            raise ValueError(f"kernels must be auto|fused|reference, got {mode!r}")
        device = torch.device(device)
        if mode == "fused" and device.type != "cuda" and fused is None:
            raise RuntimeError("kernels='fused' needs a CUDA device (mamba-ssm / causal-conv1d); this is "
                               f"{device.type}. Use kernels='auto' or 'reference'.")
        injected = fused is not None
        if mode == "reference":
            fused = FusedOps()
        elif fused is None:
            fused = load_fused() if device.type == "cuda" else FusedOps()
        self.f = fused
        self._causal = causal_cuda if device.type == "cuda" else causal_cpu  # prefill attention, per device
        self.ssm_decode_indexed = fused.selective_state_update is not None and accepts(
            fused.selective_state_update, "state_batch_indices")
        self.ssd_state_dtype_arg = fused.mamba_chunk_scan_combined is not None and accepts(
            fused.mamba_chunk_scan_combined, "state_dtype")
        self.report = {
            "ssd_prefill": "fused:mamba_chunk_scan_combined" if fused.mamba_chunk_scan_combined else "reference",
            "ssm_decode": ("fused:selective_state_update" + ("" if self.ssm_decode_indexed else "+gather"))
            if fused.selective_state_update else "reference",
            "conv_prefill": "fused:causal_conv1d_fn" if fused.causal_conv1d_fn else "reference",
            "conv_decode": "fused:causal_conv1d_update" if fused.causal_conv1d_update else "reference",
            "add_norm": "fused:rms_norm_fn" if fused.rms_norm_fn else "reference",
            "gated_norm": "fused:rmsnorm_fn(gated)" if fused.rmsnorm_gated else "reference",
            "swiglu": "fused:swiglu" if fused.swiglu else "reference",
            "attention": "sdpa",
            "linear": "torch",
            "decode_attention": "fused:paged_decode_attention" if fused.paged_decode_attention else "gather+sdpa",
        }
        # projections: F.linear (cuBLAS on CUDA), oneDNN's on CPU (see cpu_linear)
        self.linear: Callable = (cpu_linear() if device.type == "cpu" else None) or F.linear
        if self.linear is not F.linear:
            self.report["linear"] = "onednn:_linear_pointwise"
        # LoRA deltas (model/network/lora.py; used only with adapters on): the segmented Triton kernels on CUDA
        self.lora: Callable = lora_reference
        self.report["lora"] = "reference"
        if device.type == "cpu":
            self.lora, self.report["lora"] = lora_cpu, "cpu:segmented|all_slots"
        elif device.type == "cuda" and mode != "reference":
            from model.network.lora_triton import lora_triton

            self.lora, self.report["lora"] = lora_triton, "triton:segmented_shrink_expand"
        self._rowscale: dict[tuple[float, torch.device], torch.Tensor] = {}
        self._rowscale_retired: list[torch.Tensor] = []
        if mode == "fused":
            # Injected kernels (tests) must cover at least the state ops; loaded ones must cover everything.
            need = OPS[:4] if injected else OPS
            missing = [op for op in need if self.report[op] in ("reference", "gather+sdpa")]
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
        # x head-dim-contiguous in every call (the varlen call's gathered x already is). After the conv's
        # transpose x is sequence-major, except for a 1-token chunk, whose size-1 dim loses that stride, and
        # mamba-ssm then copies it to this layout itself. The autotuner tunes once per key (sizes + dtypes,
        # not strides) and reuses its pick for every layout, but a config's shared memory depends on the
        # layout: compiled for sm_90, the one taking 115 KB sequence-major takes 279 KB here (over 227 KB),
        # so a pick made on one layout could fail to launch on the other (bench/compile_report.py).
        y, final = self.f.mamba_chunk_scan_combined(
            x.contiguous(), dt, A, B, C, chunk_size, D=D, z=None, dt_bias=dt_bias, initial_states=initial_states,
            dt_softplus=True, dt_limit=tuple(dt_limit), return_final_states=True, **extra)
        return y, final

    def ssm_params(self, A_log, D, dt_bias, head_dim: int, d_state: int, A=None) -> SsmParams:
        """Once per Mamba layer at load: A_log (or A itself), D, dt_bias (h,) fp32 -> ssm_decode's constants."""
        A = -torch.exp(A_log.float()) if A is None else A.float()
        if self.f.selective_state_update is None:
            return SsmParams(A, D, dt_bias)
        h = A.shape[0]
        # The kernel wants per-(head, channel) parameters; expanded views with stride 0 over p (and n) let
        # it take its "tied head dim" fast path.
        return SsmParams(A, D, dt_bias, A_e=A[:, None, None].expand(h, head_dim, d_state),
                         D_e=D[:, None].expand(h, head_dim), bias_e=dt_bias[:, None].expand(h, head_dim),
                         zero_bias_e=torch.zeros(h, device=A.device)[:, None].expand(h, head_dim))

    def ssm_decode(self, state_pool, slots, x, dt, A, B, C, D, dt_bias, dt_limit, params: SsmParams | None = None,
                   runs=()):
        """state_pool (S, h, p, n); slots (B,) long / int32 or a slice (a run of consecutive slots); x (B, h, p);
        dt (B, h); B, C (B, g, n); A, D, dt_bias (h,) fp32, or their prepared form in `params` (ssm_params).
        Returns y (B, h, p)."""
        if self.f.selective_state_update is None:
            return ssd.ssm_decode_inplace(state_pool, _long(slots), x, dt, A, B, C, D, dt_bias, dt_limit, runs)
        h, p, n = state_pool.shape[1:]
        P = params if params is not None else self.ssm_params(None, D, dt_bias, p, n, A=A)
        if tuple(dt_limit) != ssd.NO_DT_LIMIT:  # the kernel has no clamp: discretize here
            # (a zero bias, not None: the kernel reads dt_bias.stride() unconditionally)
            dt, softplus, bias_e = ssd.discretize_dt(dt, P.dt_bias, dt_limit), False, P.zero_bias_e
        else:
            softplus, bias_e = True, P.bias_e
        dt_e = dt[:, :, None].expand(-1, h, p)
        if self.ssm_decode_indexed:
            return self.f.selective_state_update(
                state_pool, x, dt_e, P.A_e, B, C, D=P.D_e, z=None, dt_bias=bias_e, dt_softplus=softplus,
                state_batch_indices=_slot_index(slots, torch.long, state_pool.device))
        slots = _long(slots)  # older mamba_ssm: gather, update, scatter
        state = state_pool[slots]
        y = self.f.selective_state_update(state, x, dt_e, P.A_e, B, C, D=P.D_e, z=None, dt_bias=bias_e,
                                          dt_softplus=softplus)
        if isinstance(slots, slice):
            state_pool[slots] = state
        else:
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
        """x (B, d) (a column slice of in_proj's output is fine: the kernel takes strides); conv_pool
        (S, d, w-1) updated in place at slots (as ssm_decode). Returns (B, d)."""
        if self.f.causal_conv1d_update is None:
            return ssd.conv_decode_inplace(x, conv_pool, _long(slots), weight, bias)
        return self.f.causal_conv1d_update(x, conv_pool, weight, bias, activation="silu",
                                           conv_state_indices=_slot_index(slots, torch.int32, conv_pool.device))

    def check_slots(self, conv: torch.Tensor) -> None:
        """Start-up: the conv pool (layers, S, d, w-1) is addressable by causal_conv1d_update's 32-bit offsets
        up to its last slot (the micro: ~329K slots), or a clear error instead of updating a wrong slot."""
        layer = conv[0]
        end = sum((n - 1) * st for n, st in zip(layer.shape, layer.stride(), strict=True))
        if self.f.causal_conv1d_update is not None and end >= CONV_OFFSET_LIMIT:
            raise RuntimeError(f"{layer.shape[0]} conv state slots (the dummy one included) exceed the 32-bit "
                               f"offsets of causal_conv1d_update ({layer[0].numel()} elements per slot); "
                               "lower MAX_CONCURRENT_SEQS")

    def decode_meta(self, slots, block_tables, positions, block_size: int, runs=()) -> DecodeMeta:
        """slots (B,) long or a slice of consecutive slots; block_tables (B, mb) long; positions (B,) long;
        runs: the slots as (first, count) runs, host ints (the reference state update uses them)."""
        if self.f.selective_state_update is not None or self.f.causal_conv1d_update is not None:
            slots = _slot_index(slots, torch.long, block_tables.device)  # once per step, not per layer
        conv_slots = slots if self.f.causal_conv1d_update is None else slots.to(torch.int32)
        kv_index = block_tables.gather(1, (positions // block_size)[:, None])[:, 0] * block_size \
            + positions % block_size
        return DecodeMeta(slots, block_tables, positions, kv_index, runs, conv_slots)

    # ---- norms / MLP activation ------------------------------------------------------------
    def _rowscale_of(self, rows: int, scale: float, device) -> torch.Tensor:
        """(rows,) fp32 filled with scale: a slice of one buffer per scale, replaced by a bigger one when more
        rows come (a long prefill). Replaced buffers are kept alive: a captured decode graph may read one.
        (Decode warm-up runs every bucket eagerly before its capture, so captures never allocate here.)"""
        buf = self._rowscale.get((scale, device))
        if buf is None or buf.shape[0] < rows:
            if buf is not None:
                self._rowscale_retired.append(buf)
            buf = torch.full((max(rows, 64),), scale, dtype=torch.float32, device=device)
            self._rowscale[(scale, device)] = buf
        return buf[:rows]

    def add_norm(self, x, residual, weight, eps: float, scale: float):
        """x, residual (N, hidden) (residual None: the first layer) -> (rms_norm(r), r) with
        r = residual + x * scale, in x's dtype (HF: `residual + hidden * residual_multiplier`)."""
        if self.f.rms_norm_fn is None:
            r = x * scale if residual is None else residual + x * scale
            return rms_norm(r, weight, eps), r
        # rowscale multiplies x before the residual add (fp32 in registers); prenorm returns r as well
        return self.f.rms_norm_fn(x, weight, None, residual=residual, eps=eps, prenorm=True,
                                  rowscale=self._rowscale_of(x.shape[0], scale, x.device))

    def gated_norm(self, y, gate, weight, eps: float, groups: int):
        """y, gate (N, d) -> RMSNorm(y * silu(gate)) per group of d / groups channels, y's dtype."""
        if self.f.rmsnorm_gated is None:
            return gated_rms_norm(y, gate, weight, eps, groups)
        return self.f.rmsnorm_gated(y, weight, None, z=gate, eps=eps, group_size=y.shape[-1] // groups,
                                    norm_before_gate=False)

    def swiglu(self, gate_up):
        """gate_up (N, 2m) = [gate | up] -> silu(gate) * up (N, m)."""
        if self.f.swiglu is None:
            gate, up = gate_up.chunk(2, dim=-1)
            return F.silu(gate) * up
        return self.f.swiglu(gate_up)

    # ---- attention -------------------------------------------------------------------------
    def prefill_attention(self, q, k_cache, v_cache, pk: Packed, scale: float):
        """q (T, hq, e) packed; k_cache, v_cache (NB, block_size, hkv, e) holding the chunks' K / V; each chunk
        attends to its sequence's keys [0, start + l]. Returns (T, hq, e)."""
        return prefill_attention(q, k_cache, v_cache, pk, scale, self._causal)

    @staticmethod
    def attention(q, k, v, mask, scale):
        """q (b, hq, lq, e); k, v (b, hkv, lk, e); mask (b|1, 1, lq, lk) bool (True = attend). The decode
        reference (lq = 1); prefill never builds a mask (prefill_attention).

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

    def decode_attention(self, q, k_cache, v_cache, meta: DecodeMeta, scale: float):
        """q (B, hq, e); k_cache, v_cache (NB, block_size, hkv, e) already holding this step's K/V; row i
        attends to its positions[i] + 1 tokens in block_tables[i]. Returns (B, hq, e)."""
        if self.f.paged_decode_attention is not None:  # reads each live block once, in place
            return self.f.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.positions, scale)
        # whole blocks (bs * kv_heads * e contiguous values each), not single rows: one wide gather
        keys = k_cache[meta.block_tables].flatten(1, 2).to(q.dtype)  # (B, T = mb * bs, kv_heads, e)
        vals = v_cache[meta.block_tables].flatten(1, 2).to(q.dtype)
        mask = torch.arange(keys.shape[1], device=q.device)[None, :] <= meta.positions[:, None]  # (B, T)
        o = self.attention(q[:, :, None], keys.transpose(1, 2), vals.transpose(1, 2), mask[:, None, None],
                           scale)  # (B, hq, 1, e)
        return o[:, :, 0]
