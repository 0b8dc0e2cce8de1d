"""The LoRA Triton kernel (model/network/lora_triton.py) compiled and run on the GPU against the torch reference
(model/network/lora.py): the cases tests/triton/test_lora_interp.py runs under the interpreter on CPU, here on
CUDA (make test-gpu, bench/gpu_check.sh). Segments of mixed adapters with base rows between, ranks below the
padded one, fp32 and bf16; base rows come out bit for bit; fixed-buffer decode reads only its live rows."""

from __future__ import annotations

import pytest
import torch

from model.network.lora import LoraStep, lora_gathered, lora_segmented
from model.network.lora_triton import lora_triton

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEV = "cuda"


def _stacks(gen, L, r, k, out, dtype):
    A = (torch.randn(L, r, k, generator=gen) * 0.2).to(DEV, dtype)
    B = (torch.randn(L, out, r, generator=gen) * 0.2).to(DEV, dtype)
    return A, B


def _tol(dtype):
    return 1e-4 if dtype == torch.float32 else 3e-2


@pytest.mark.parametrize("rows, k, out, r", [
    ([0, 0, 0, -1, 1, 1, 2, -1, -1, 0], 40, 70, 4),
    ([1] * 37 + [-1] * 5 + [0] * 20, 64, 33, 16),
    ([2, -1, 0, 1, 2, 0], 130, 150, 8),
    ([0] * 300 + [1] * 200, 2048, 6144, 16),  # a packed prefill at the micro's width (hidden 2048 -> in_proj)
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segments_match_the_reference_on_cuda(rows, k, out, r, dtype):
    gen = torch.Generator().manual_seed(len(rows) + k)
    A, B = _stacks(gen, 3, r, k, out, dtype)
    x = torch.randn(len(rows), k, generator=gen).to(DEV, dtype)
    y = torch.randn(len(rows), out, generator=gen).to(DEV, dtype)
    step = LoraStep(DEV)
    step.set_rows(rows)
    ref = lora_segmented(x.float(), y.float(), A.float(), B.float(), step.groups)
    got = lora_triton(x, y.clone(), A, B, step)
    torch.testing.assert_close(got.float(), ref, atol=_tol(dtype), rtol=_tol(dtype))
    base = [i for i, g in enumerate(rows) if g < 0]
    assert torch.equal(got[base], y[base])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fixed_buffer_decode_on_cuda_reads_only_its_rows(dtype):
    gen = torch.Generator().manual_seed(3)
    A, B = _stacks(gen, 4, 8, 48, 96, dtype)
    idx = torch.tensor([3, -1, 0, 0, 2, -1, -1, -1], device=DEV)
    x = torch.randn(8, 48, generator=gen).to(DEV, dtype)
    y = torch.randn(8, 96, generator=gen).to(DEV, dtype)
    x[5:] = float("nan")
    y[5:] = float("nan")
    step = LoraStep(DEV)
    step.use_index(idx)
    got = lora_triton(x, y.clone(), A, B, step)
    ref = lora_gathered(x[:5].float(), y[:5].float(), A.float(), B.float(), idx[:5])
    torch.testing.assert_close(got[:5].float(), ref, atol=_tol(dtype), rtol=_tol(dtype))
    assert torch.equal(got[1], y[1]) and got[5:].isnan().all()
