"""model/network/lora_triton.py under the interpreter against the reference (model/network/lora.py): segments of
mixed adapters and rows without one, ranks below the padded one, fp32 and bf16, the eager steps' segments from
LoraStep.set_rows and the fixed-buffer decode's per-row index (use_index); rows without an adapter are untouched
(bit for bit) and rows outside every segment are never read (NaN there stays there, nowhere else)."""

from __future__ import annotations

import pytest
import torch

from model.network.lora import LoraStep, lora_gathered, lora_segmented
from model.network.lora_triton import lora_triton


def _stacks(gen, L, r, k, out, dtype):
    A = (torch.randn(L, r, k, generator=gen) * 0.2).to(dtype)
    B = (torch.randn(L, out, r, generator=gen) * 0.2).to(dtype)
    return A, B


@pytest.mark.parametrize("rows, k, out, r", [
    ([0, 0, 0, -1, 1, 1, 2, -1, -1, 0], 40, 70, 4),  # runs of prefill tokens, base rows between
    ([1] * 37 + [-1] * 5 + [0] * 20, 64, 33, 16),  # runs longer than BLOCK_M; rank = the padded rank
    ([2, -1, 0, 1, 2, 0], 130, 150, 8),  # decode rows: every row its own segment; K and OUT past one block
    ([-1, -1, -1], 16, 16, 4),  # no adapter in the step
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segments_match_the_reference(rows, k, out, r, dtype):
    gen = torch.Generator().manual_seed(len(rows) + k)
    A, B = _stacks(gen, 3, r, k, out, dtype)
    x = torch.randn(len(rows), k, generator=gen).to(dtype)
    y = torch.randn(len(rows), out, generator=gen).to(dtype)
    step = LoraStep("cpu")
    step.set_rows(rows)
    ref = lora_segmented(x.float(), y.float(), A.float(), B.float(), step.groups) if step.active else y.float()
    got = lora_triton(x, y.clone(), A, B, step) if step.active else y
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)
    base = [i for i, g in enumerate(rows) if g < 0]
    assert torch.equal(got[base], y[base])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fixed_buffer_decode_matches_gathered_and_reads_only_its_rows(dtype):
    """A bucket of 8 rows, 5 live (padding rows: adapter -1 and NaN inputs), through use_index as static decode
    binds it."""
    gen = torch.Generator().manual_seed(3)
    A, B = _stacks(gen, 4, 8, 48, 96, dtype)
    idx = torch.tensor([3, -1, 0, 0, 2, -1, -1, -1])
    x = torch.randn(8, 48, generator=gen).to(dtype)
    y = torch.randn(8, 96, generator=gen).to(dtype)
    x[5:] = float("nan")
    y[5:] = float("nan")
    step = LoraStep("cpu")
    step.use_index(idx)
    got = lora_triton(x, y.clone(), A, B, step)
    ref = lora_gathered(x[:5].float(), y[:5].float(), A.float(), B.float(), idx[:5])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got[:5].float(), ref, atol=tol, rtol=tol)
    assert torch.equal(got[1], y[1]) and got[5:].isnan().all()


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_through_the_network_equals_the_reference(tiny_ckpt, tmp_path, mode):
    """The tiny model with 3 peft adapters and a base row in one packed prefill and decode steps: the Triton op in
    Kernels.lora gives the reference op's logits (static: the per-row index buffer of fixed-buffer decode)."""
    from model.network.kernels import Kernels
    from model.runtime.runner import ModelRunner
    from model.types import EngineConfig, SeqChunk, StepBatch
    from tests.lora_helpers import ADAPTERS, make_adapter

    paths = {n: make_adapter(tiny_ckpt, tmp_path / n, seed=i, **kw) for i, (n, kw) in enumerate(ADAPTERS.items())}
    cfg = EngineConfig(max_concurrent_seqs=4, max_input_tokens=32, max_total_tokens=64, kv_cache_tokens=512,
                       max_loras=3, max_lora_rank=8)
    outs = []
    for op in ("reference", "triton"):
        r = ModelRunner(tiny_ckpt, cfg, decode_mode=mode)
        if op == "triton":
            k = Kernels("auto", "cpu")
            k.lora = lora_triton
            r.kernels = k  # the setter rebinds the network and the LoRA terms
        for n, p in paths.items():
            r.adapters.register(n, str(p))
        names = ["de", None, "fr", "ja"]
        slots = [r.allocator.allocate(32) for _ in names]
        for s, n in zip(slots, names, strict=True):
            if n is not None:
                r.adapters.hold(n)
                r.adapters.bind(s, n)
        prompts = [[5, 9, 14, 3], [7, 7, 21], [30, 2, 8, 11, 40], [6, 12]]
        got = [r.forward(StepBatch(tuple(SeqChunk.fresh(s, tuple(p), True) for s, p in zip(slots, prompts, strict=True))))]
        for j in range(2):
            got.append(r.forward(StepBatch(tuple(SeqChunk.decode(s, 50 + j, len(p) + j)
                                                 for s, p in zip(slots, prompts, strict=True)))))
        outs.append(got)
    for ref, tri in zip(*outs, strict=True):
        torch.testing.assert_close(tri, ref, atol=1e-4, rtol=1e-4)
