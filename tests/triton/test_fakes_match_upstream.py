"""tests/fake_kernels.py (the CPU suite's stand-ins) against the real mamba-ssm 2.3.2.post1 Triton kernels
under the interpreter: same signature, same outputs and output dtypes, the same crashes, the same padding
rows. causal-conv1d is CUDA C++ (no interpreter): its stand-in mirrors csrc/causal_conv1d.cpp's checks."""

from __future__ import annotations

import inspect

import pytest
import torch

from tests import fake_kernels


def _ssu_inputs(seed=0, batch=3, h=2, p=16, n=16, g=1):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    state = r(batch + 2, h, p, n) * 0.5
    # per-(head, channel) parameters as model/network/kernels.py passes them: stride-0 views over p ("tied" path)
    dt = r(batch, h)[:, :, None].expand(-1, h, p)
    A = (-torch.rand(h, generator=gen) - 0.5)[:, None, None].expand(h, p, n)
    dt_bias = (r(h) * 0.5 - 1)[:, None].expand(h, p)
    D = r(h)[:, None].expand(h, p)
    return state, r(batch, h, p), dt, A, r(batch, g, n), r(batch, g, n), D, dt_bias


def test_selective_state_update_fake_equals_real(mamba_ops):
    real = mamba_ops.selective_state_update
    assert list(inspect.signature(real).parameters) == list(inspect.signature(
        fake_kernels.selective_state_update).parameters)
    state, x, dt, A, B, C, D, dt_bias = _ssu_inputs()
    idx = torch.tensor([4, -1, 1], dtype=torch.int32)  # a padding row (negative index)
    s_real, s_fake = state.clone(), state.clone()
    y_real = real(s_real, x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, state_batch_indices=idx)
    y_fake = fake_kernels.selective_state_update(s_fake, x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True,
                                                 state_batch_indices=idx)
    torch.testing.assert_close(y_fake, y_real, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_fake, s_real, atol=1e-5, rtol=1e-5)
    assert bool((y_real[1] == 0).all()) and torch.equal(s_real[[0, 2, 3]], state[[0, 2, 3]])


@pytest.mark.parametrize("missing", ["D", "dt_bias"])
def test_selective_state_update_crashes_alike_without_D_or_dt_bias(mamba_ops, missing):
    state, x, dt, A, B, C, D, dt_bias = _ssu_inputs()
    kw = {"D": D, "dt_bias": dt_bias, missing: None}
    for fn in (mamba_ops.selective_state_update, fake_kernels.selective_state_update):
        with pytest.raises((TypeError, AttributeError)):
            fn(state[:3].clone(), x, dt, A, B, C, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunk_scan_fake_equals_real_and_returns_fp32_final_states(mamba_ops, dtype):
    real = mamba_ops.mamba_chunk_scan_combined
    assert "state_dtype" not in inspect.signature(real).parameters
    assert list(inspect.signature(real).parameters) == list(inspect.signature(
        fake_kernels.mamba_chunk_scan_combined).parameters)
    gen = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    b, seqlen, h, p, g, n = 1, 20, 2, 16, 1, 16
    x, dt, B, C = r(b, seqlen, h, p), r(b, seqlen, h), r(b, seqlen, g, n) / 5, r(b, seqlen, g, n)
    A, D, dt_bias, init = -torch.rand(h, generator=gen) - 0.5, r(h), r(h) * 0.5 - 2, r(b, h, p, n) * 0.5
    args = [t.to(dtype) for t in (x, dt)] + [A] + [t.to(dtype) for t in (B, C)]
    kw = dict(D=D, dt_bias=dt_bias, initial_states=init.to(dtype), dt_softplus=True, return_final_states=True)
    y_real, f_real = real(*args, 16, **kw)
    y_fake, f_fake = fake_kernels.mamba_chunk_scan_combined(*args, 16, **kw)
    assert f_real.dtype == f_fake.dtype == torch.float32 and y_real.dtype == y_fake.dtype == dtype
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y_fake.float(), y_real.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(f_fake, f_real, atol=tol, rtol=tol)
