"""The real mamba-ssm Triton norms / SwiGLU through Kernels (add_norm, gated_norm, swiglu) against the
reference formulas (HF Granite's), under the interpreter. fp32 and fp16 (the interpreter's bf16 rounding
is not the GPU's, so bf16 is left to tests/gpu)."""

from __future__ import annotations

import pytest
import torch

from model.network.fused_ops import FusedOps
from model.network.kernels import Kernels

DTYPES = {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.float16: dict(atol=4e-3, rtol=4e-3)}


@pytest.fixture(scope="module")
def kernels(mamba_ops):
    ops = FusedOps(rms_norm_fn=mamba_ops.rms_norm_fn, rmsnorm_gated=mamba_ops.rmsnorm_gated,
                   swiglu=mamba_ops.swiglu)
    K = Kernels("auto", "cpu", fused=ops)
    assert [K.report[op] for op in ("add_norm", "gated_norm", "swiglu")] == [
        "fused:rms_norm_fn", "fused:rmsnorm_fn(gated)", "fused:swiglu"]
    return K, Kernels("reference", "cpu")


def _r(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows", [1, 5])
def test_add_norm(kernels, dtype, rows):
    """residual + x * scale (first layer: no residual, the embedding multiplier) then RMSNorm; both outputs."""
    K, ref = kernels
    gen = torch.Generator().manual_seed(rows)
    w = (1 + 0.2 * torch.randn(96, generator=gen)).to(dtype)
    x, res = _r(gen, rows, 96, dtype=dtype), _r(gen, rows, 96, dtype=dtype)
    for residual, scale in ((None, 12.0), (res, 0.22), (res, 1.0)):
        y1, r1 = K.add_norm(x, residual, w, 1e-5, scale)
        y2, r2 = ref.add_norm(x, residual, w, 1e-5, scale)
        assert y1.dtype == r1.dtype == dtype and y1.shape == r1.shape == x.shape
        torch.testing.assert_close(r1, r2, **DTYPES[dtype])
        torch.testing.assert_close(y1, y2, **DTYPES[dtype])
    # a bigger batch after a smaller one: the rowscale buffer grows, older slices stay right
    xb, rb = _r(gen, 80, 96, dtype=dtype), _r(gen, 80, 96, dtype=dtype)
    torch.testing.assert_close(K.add_norm(xb, rb, w, 1e-5, 0.22)[0], ref.add_norm(xb, rb, w, 1e-5, 0.22)[0],
                               **DTYPES[dtype])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("groups", [1, 2])
def test_gated_norm_matches_hf_semantics(kernels, dtype, groups):
    """norm(y * silu(gate)) per group (norm_before_gate=False); the gate is a column slice of a wider
    projection output, as in MambaMixer.decode (row stride != width: no copy needed)."""
    K, ref = kernels
    gen = torch.Generator().manual_seed(groups)
    d = 64
    proj = _r(gen, 3, 2 * d + 20, dtype=dtype)
    gate, y = proj[:, :d], _r(gen, 3, d, dtype=dtype)
    assert not gate.is_contiguous()
    w = (1 + 0.2 * torch.randn(d, generator=gen)).to(dtype)
    out = K.gated_norm(y, gate, w, 1e-5, groups)
    torch.testing.assert_close(out, ref.gated_norm(y, gate, w, 1e-5, groups), **DTYPES[dtype])
    if groups == 2:  # per-group statistics really differ from one group over all channels
        assert not torch.allclose(out.float(), ref.gated_norm(y, gate, w, 1e-5, 1).float(), atol=1e-3)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_swiglu(kernels, dtype):
    K, ref = kernels
    gen = torch.Generator().manual_seed(3)
    gu = _r(gen, 4, 2 * 48, dtype=dtype)
    out = K.swiglu(gu)
    assert out.shape == (4, 48)
    torch.testing.assert_close(out, ref.swiglu(gu), **DTYPES[dtype])
