"""Kernel launches per decode step of the full-size micro layer pattern, and decode-attention KV bytes.

Launches: a TorchDispatchMode counts every aten op of one `GraniteForCausalLM.decode` (embedding to final
norm, what a decode CUDA graph captures) except views and bare allocations (no kernel runs for them), on
CPU. The fused path runs the REAL Python wrappers (mamba-ssm's rms_norm_fn / rmsnorm_fn / swiglu /
selective_state_update, model/network/paged_attention.py): each Triton kernel launch is intercepted at
`kernel[grid](...)`, counted as one launch and not executed; causal_conv1d_update (CUDA C++) is a one-launch
stand-in. Outputs are therefore garbage: only the count means anything.

The count does not depend on widths (no op loops over heads, channels or tokens at decode), so the network
keeps the real 40-layer pattern (attention at 5, 15, 25, 35; 32/8 heads) at small widths; `widths_agree`
checks that by counting a second, wider build. bf16 weights and state, as on a GPU.

KV bytes: see model/network/paged_attention.py (kv_bytes_paged, kv_bytes_gather): computed from the kernel's access
pattern over the block tables of batch 64 x 16K context, against the ideal (every live K/V row read once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_TARGET = 450
KV_RATIO_TARGET = 1.25
_GEMMS = ("mm", "addmm", "bmm", "baddbmm")
DECODE_OPS = ("ssm_decode", "conv_decode", "add_norm", "gated_norm", "swiglu", "decode_attention")
_FREE = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")  # allocation: no kernel


class LaunchCounter(TorchDispatchMode):
    """Counts aten ops that launch a kernel, plus the Triton launches reported through `triton`."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (func.is_view or name in _FREE):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    def triton(self, name: str) -> None:
        self.ops[f"triton:{name}"] += 1

    def summary(self) -> dict:
        total = sum(self.ops.values())
        gemm = sum(n for k, n in self.ops.items() if k in _GEMMS)
        fused = sum(n for k, n in self.ops.items() if k.startswith(("triton:", "cuda:")))
        return {"launches": total, "gemm": gemm, "fused": fused, "other": total - gemm - fused,
                "by_op": dict(self.ops.most_common())}


@contextlib.contextmanager
def _triton_counted(counter: LaunchCounter):
    """kernel[grid](...) counts one launch and returns without running; torch.cuda.device(None) is a no-op
    for the wrappers' CPU tensors. Both restored on exit."""
    from triton.runtime.jit import KernelInterface

    def getitem(self, grid):
        fn = self
        while hasattr(fn, "fn"):  # Autotuner / Heuristics wrap the JITFunction
            fn = fn.fn
        return lambda *a, **k: counter.triton(getattr(fn, "__name__", "kernel"))

    old_getitem, old_device = KernelInterface.__getitem__, torch.cuda.device
    KernelInterface.__getitem__ = getitem
    torch.cuda.device = lambda index: contextlib.nullcontext() if index is None else old_device(index)
    try:
        yield
    finally:
        KernelInterface.__getitem__, torch.cuda.device = old_getitem, old_device


@contextlib.contextmanager
def _mamba_modules_restored():
    """Leave sys.modules' mamba_ssm entries as found: model.kernels may register a bare mamba_ssm package
    (its __init__ needs CUDA), and transformers, imported later in the same process, would then bind
    mamba-ssm's Triton kernels for its CPU forward."""
    before = {k: v for k, v in sys.modules.items() if k == "mamba_ssm" or k.startswith("mamba_ssm.")}
    try:
        yield
    finally:
        for k in [k for k in sys.modules if k == "mamba_ssm" or k.startswith("mamba_ssm.")]:
            del sys.modules[k]
        sys.modules.update(before)


def micro_arch(width_scale: int = 1):
    """The full-size micro layer pattern (bench/micro_config.json) at small widths (x width_scale)."""
    from transformers import GraniteMoeHybridConfig

    from model.network.arch import GraniteArch

    full = GraniteArch.from_hf_config(
        GraniteMoeHybridConfig(**json.loads((ROOT / "bench" / "micro_config.json").read_text())))
    s = width_scale
    # kv_heads 8 -> 32 query heads as in the micro (GQA 4); Mamba 8 heads x 8, d_state 16, 1 group
    return dataclasses.replace(full, vocab_size=256, hidden=64 * s, head_dim=8 * s, mlp_inner=96 * s,
                               m_heads=8 * s, m_head_dim=8, m_state=16 * s, m_chunk=16), full


def _fused_ops(counter: LaunchCounter):
    from model.network.fused_ops import load_fused

    ops = load_fused(cuda=False)  # the Triton modules only (imports fine without a GPU)
    missing = [n for n in ops.TRITON if getattr(ops, n) is None]
    if missing:
        raise RuntimeError(f"Triton kernels not importable ({missing}): {ops.errors}; run make install")

    def conv_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                    conv_state_indices=None):
        counter.ops["cuda:causal_conv1d_update"] += 1  # one CUDA C++ launch; the result is not computed
        return torch.empty_like(x)

    ops.causal_conv1d_update = conv_update
    return ops


def count_decode(arch, fused: bool | str, batch: int = 4, context: int = 1040) -> dict:
    """Launches of one decode step (batch rows at `context` tokens: several attention splits) on CPU, bf16,
    after a first step (one-time constants and buffers, as before a CUDA graph capture). fused: True (every
    fused kernel), "state" (only the two state kernels, as before the fused norms / attention), False."""
    from model.network.granite import GraniteForCausalLM
    from model.runtime.state import BLOCK_SIZE, StatePool

    torch.manual_seed(0)
    dtype = torch.bfloat16
    model = GraniteForCausalLM(arch).to(dtype).eval()
    for layer in model.model.layers:
        if layer.kind == "mamba":
            for p in (layer.mamba.A_log, layer.mamba.D, layer.mamba.dt_bias):
                p.data = torch.rand(p.shape)  # fp32, as load_granite keeps them
    nb = -(-context // BLOCK_SIZE) + 1
    pool = StatePool(arch, batch, batch * nb * BLOCK_SIZE, "cpu", dtype, dtype)
    counter = LaunchCounter()
    with _mamba_modules_restored():
        return _count(model, pool, counter, fused, batch, nb, context)


def _count(model, pool, counter, fused, batch, nb, context) -> dict:
    from model.network.fused_ops import FusedOps
    from model.network.kernels import Kernels

    if fused:
        ops = _fused_ops(counter)
        if fused == "state":
            ops = FusedOps(selective_state_update=ops.selective_state_update,
                           causal_conv1d_update=ops.causal_conv1d_update)
        K = Kernels("auto", "cpu", fused=ops)
        want = DECODE_OPS if fused is True else DECODE_OPS[:2]
        unfused = [op for op in want if not K.report[op].startswith("fused")]
        if unfused:
            raise RuntimeError(f"decode ops not on their fused kernel: {unfused}")
    else:
        K = Kernels("reference", "cpu")
    from model.network.decode_batch import Decode

    model.bind(pool, K)
    ids = torch.arange(batch) + 1
    slots = torch.arange(batch)
    tables = torch.arange(batch * nb).view(batch, nb)
    positions = torch.full((batch,), context - 1)
    with _triton_counted(counter) if fused else contextlib.nullcontext():
        model.decode(Decode(ids, slots, positions, tables))  # warm-up, not counted
        counter.ops.clear()
        positions = positions + 1
        with counter:
            model.decode(Decode(ids, slots, positions, tables))
    return counter.summary()


# The same counter over the same step at commit beba698 (before the fused norms / SwiGLU / paged attention,
# per-step constants and per-layer slot casts): a record, since that code no longer exists here.
BEFORE = {"launches": 1766, "gemm": 168, "fused": 72, "other": 1526, "commit": "beba698"}


def _brief(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "by_op"}


def launches_report() -> dict:
    small, _full = micro_arch(1)
    after = count_decode(small, fused=True)
    wider = count_decode(micro_arch(2)[0], fused=True)
    state_only = _brief(count_decode(small, fused="state"))
    return {
        "pattern": "40 layers, attention at 5/15/25/35, 32 q / 8 kv heads, bf16, batch 4 x 1K context; "
                   "widths shrunk (the count is width-free: widths_agree)",
        "before": BEFORE, "after": after,
        "state_kernels_only_now": state_only,
        "widths_agree": after["launches"] == wider["launches"],
        "target": LAUNCH_TARGET, "meets_target": after["launches"] <= LAUNCH_TARGET,
    }


def _kv(lengths: list[int]) -> dict:
    from model.network import paged_attention as pa
    from model.runtime.state import BLOCK_SIZE

    _, full = micro_arch()
    kw = {"kv_heads": full.n_kv_heads, "head_dim": full.head_dim, "elem_bytes": 2, "block_size": BLOCK_SIZE,
          "layers": full.n_attention}
    ideal = pa.kv_bytes_ideal(lengths, **kw)
    paged = pa.kv_bytes_paged(lengths, q_heads=full.n_heads, **kw)
    gather = pa.kv_bytes_gather(lengths, q_heads=full.n_heads, **kw)
    return {"ideal_bytes": ideal, "paged_bytes": paged, "paged_ratio": round(paged / ideal, 4),
            "gather_bytes": gather, "gather_ratio": round(gather / ideal, 4)}


def kv_report(batch: int = 64, context: int = 16384) -> dict:
    """bf16 full-size micro, all 4 attention layers, one decode step."""
    uniform = _kv([context] * batch)
    return {"batch": batch, "context": context, **uniform,
            "mixed_one_long_rest_2k": _kv([context] + [2048] * (batch - 1)),
            "target_ratio": KV_RATIO_TARGET, "meets_target": uniform["paged_ratio"] <= KV_RATIO_TARGET}


def report() -> dict:
    return {"launches_per_decode_step": launches_report(), "decode_kv_bytes": kv_report()}


if __name__ == "__main__":
    print(json.dumps(report(), indent=2))
