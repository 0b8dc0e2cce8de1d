"""The full-size micro served on the `meta` device by our own ModelRunner with the fused kernels, so that
bench/triton_compile.py compiles what a GPU server would: model/network/kernels.py's call sites with the real
shapes, strides and dtypes (bf16 weights, 64 slots, static decode: the fixed buffers CUDA graphs capture).

Layers: the micro's first LAYERS layers (Mamba 0-4, attention 5), at full width. No kernel argument
depends on the layer count or index: every Mamba layer calls the kernels with the same shapes and strides
on its own views of the state pool, and each layer's view starts 16-byte aligned (pointer alignment is
part of a Triton specialization): `layer_views_aligned` checks that on the 40-layer pool. Layer 0 adds no
residual, every later norm does: both variants are in the first layers. 40 layers would cost 7x the
(meta) forward time to compile nothing more.

Meta tensors have no values: the sampled token is always 0 (sampling is torch, not a kernel compiled
here); causal-conv1d (CUDA C++, not compiled here) returns its allocated output as it does (empty_like).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import warnings
from pathlib import Path

import torch

from bench import triton_compile as tc

ROOT = Path(__file__).resolve().parent.parent
MAX_SEQS = 64
LAYERS = 6
# The serving mix a test replays after warmup. A step is a tuple of chunks: ("fresh", n) a new prompt's
# first n tokens, ("cont", start, n) n more tokens of a sequence holding `start`, ("decode", position).
STEPS = (
    (("fresh", 1),), (("fresh", 7),), (("fresh", 16),), (("fresh", 129),), (("fresh", 256),), (("fresh", 512),),
    (("fresh", 3), ("fresh", 5)), (("fresh", 16), ("fresh", 16)), (("fresh", 100), ("fresh", 257), ("fresh", 31)),
    (("fresh", 512),) * 4, (("fresh", 1), ("fresh", 1)), (("fresh", 40),) * 17,
    (("cont", 512, 1),), (("cont", 129, 7),), (("cont", 512, 512),), (("cont", 1024, 300),),
    (("cont", 512, 512),) * 3, (("cont", 100, 16),) * 16, (("cont", 64, 9), ("cont", 300, 200)),
    (("cont", 30, 3),) * 20, (("cont", 4000, 96),) * 21,
    (("fresh", 50), ("cont", 512, 30)), (("fresh", 20), ("fresh", 33), ("cont", 700, 64), ("cont", 90, 5)),
    (("fresh", 40), ("decode", 100), ("decode", 2000)), (("cont", 512, 128), ("decode", 9000)),
    (("decode", 5),), (("decode", 700), ("decode", 3), ("decode", 15000)),
    tuple(("decode", 16 * i + 3) for i in range(17)), tuple(("decode", 200 * i + 1) for i in range(64)),
)


def micro_arch(layers: int | None = LAYERS):
    from transformers import GraniteMoeHybridConfig

    from model.network.arch import GraniteArch

    full = GraniteArch.from_hf_config(
        GraniteMoeHybridConfig(**json.loads((ROOT / "bench" / "micro_config.json").read_text())))
    return full if layers is None else dataclasses.replace(full, kinds=full.kinds[:layers])


def layer_views_aligned(dtype=torch.bfloat16, ssm_dtype=torch.float32) -> bool:
    """Every layer's view of the full 40-layer state pool starts 16-byte aligned (meta: data_ptr = offset)."""
    from model.runtime.state import StatePool

    pool = StatePool(micro_arch(None), MAX_SEQS, MAX_SEQS * 16384, "meta", dtype, ssm_dtype)
    return all(t[i].data_ptr() % 16 == 0 for t in (pool.conv, pool.ssm, pool.k, pool.v) for i in range(t.shape[0]))


def meta_model(layers: int | None = LAYERS):
    """The micro on the meta device: bf16 weights, A_log / D / dt_bias fp32 (as loaded)."""
    from model.network.granite import FP32_PARAMS, GraniteForCausalLM

    with torch.device("meta"):
        model = GraniteForCausalLM(micro_arch(layers)).to(torch.bfloat16)
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] in FP32_PARAMS:
            p.data = p.data.float()
    return model.eval().requires_grad_(False)


def fused_ops():
    """The Triton kernels model/network/fused_ops.py loads on CUDA, and causal-conv1d's output allocations."""
    from model.network.fused_ops import load_fused

    ops = load_fused(cuda=False)
    missing = [n for n in ops.TRITON if getattr(ops, n) is None]
    if missing:
        raise RuntimeError(f"Triton kernels not importable ({missing}): {ops.errors}; run make install")
    ops.causal_conv1d_fn = lambda x, weight, bias=None, *a, **k: torch.empty_like(x)
    ops.causal_conv1d_update = lambda x, conv_state, weight, bias=None, *a, **k: torch.empty_like(x)
    return ops


def meta_runner(model, ssm_dtype: str):
    """Our ModelRunner serving `model` on meta tensors through the fused kernels' call sites."""
    from model.network.kernels import Kernels
    from model.runtime.runner import ModelRunner
    from model.types import EngineConfig

    cfg = EngineConfig(max_concurrent_seqs=MAX_SEQS, device="meta", dtype="bfloat16", ssm_state_dtype=ssm_dtype,
                       kernels="reference", kv_cache_tokens=MAX_SEQS * EngineConfig.max_total_tokens)
    r = ModelRunner(None, cfg, decode_mode="static", model=model)
    r.kernels = Kernels("fused", r.device, fused=fused_ops())  # (kernels="fused" needs CUDA to load them)
    r.kernel_report.update(r.kernels.report)
    r.sampler.sample = lambda logits, slots, *rest: torch.zeros(len(slots), 2, dtype=torch.float64)
    return r


def run_step(runner, step) -> None:
    """One step of the serving mix, each chunk on a slot allocated for it (meta: no earlier steps needed)."""
    from model.types import SeqChunk, StepBatch

    chunks = []
    try:
        for kind, *args in step:
            start, n = (0, args[0]) if kind == "fresh" else (args[0], args[1]) if kind == "cont" else (args[0], 1)
            slot = runner.allocator.allocate(start + n + 1)
            ids = tuple(1 + i % 97 for i in range(n))
            chunks.append(SeqChunk.fresh(slot, ids, True) if kind == "fresh" else SeqChunk.decode(slot, 1, start)
                          if kind == "decode" else SeqChunk.cont(slot, ids, start, True))
        runner.step(StepBatch(tuple(chunks)))
    finally:
        for c in chunks:
            runner.allocator.free(c.slot)


@contextlib.contextmanager
def deterministic_picks():
    """mamba-ssm as imported under MAMBA_DETERMINISTIC=1 (what `make gpu-check` runs): its own
    autotune_configs() choice of one config per kernel, applied at import there and to the imported
    autotuners here, and its deterministic reductions."""
    from mamba_ssm.utils import determinism as det

    tuners = [t for t in tc.autotuners() if t.base_fn.__module__.startswith("mamba_ssm")]
    saved, override = [t.configs for t in tuners], det._deterministic_override  # noqa: SLF001
    det.set_deterministic_mode(True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Deterministic mode")  # its cached-autotuning advice
        for t in tuners:
            t.configs = det.autotune_configs(t.configs)
    try:
        yield
    finally:
        for t, configs in zip(tuners, saved, strict=True):
            t.configs = configs
        det.set_deterministic_mode(override)


def serve_once(model, a: tc.Arch, device: int, ssm_dtype: str, steps=STEPS, every_config: bool = False) -> dict:
    """A fresh server for `a` (Triton's kernel cache `device`): warmup, then `steps`. Returns the errors
    raised, the seconds of each phase and the variants compiled after warmup, per kernel."""
    runner, out = meta_runner(model, ssm_dtype), {"errors": [], "new_after_warmup": {}}
    with tc.compile_only(a, device, every_config):
        t0 = time.perf_counter()
        try:
            runner.warmup()
        except Exception as e:  # noqa: BLE001 - reported (a failure in tests/compile)
            out["errors"].append(f"warmup: {e!r}"[:500])
        out["warmup_s"] = round(time.perf_counter() - t0, 1)
        before = {k: set(v) for k, v in tc.compiled(device).items()}
        for step in steps:
            try:
                run_step(runner, step)
            except Exception as e:  # noqa: BLE001
                out["errors"].append(f"step {step[:3]}: {e!r}"[:500])
        for name, keys in tc.compiled(device).items():
            if set(keys) - before.get(name, set()):
                out["new_after_warmup"][name] = len(set(keys) - before.get(name, set()))
        out["serving_s"] = round(time.perf_counter() - t0 - out["warmup_s"], 1)
    return out
