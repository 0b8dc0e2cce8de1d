"""mamba-ssm's real selective_state_update through Kernels.ssm_decode vs model/network/ssd.py: slots of a state pool
by index (state_batch_indices), padding rows on the dummy slot, a run of consecutive slots, dt limits,
low-precision inputs and pools (no tl.dot here, so bf16 runs correctly in the interpreter)."""

from __future__ import annotations

import pytest
import torch

from model.network import ssd
from model.network.fused_ops import FusedOps
from model.network.kernels import Kernels

H, P, G, N, S = 4, 16, 1, 16, 7  # pool of S slots; the last one plays the dummy slot
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=7e-2, rtol=2e-2),
       torch.float16: dict(atol=5e-3, rtol=5e-3)}


def _fused(mamba_ops, ssu=None):
    K = Kernels("auto", "cpu", fused=FusedOps(selective_state_update=ssu or mamba_ops.selective_state_update))
    assert K.report["ssm_decode"].startswith("fused:selective_state_update")
    return K


def _inputs(rows, dtype, state_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(pool=(r(S, H, P, N) * 0.5).to(state_dtype), x=r(rows, H, P).to(dtype), dt=r(rows, H).to(dtype),
                A=-torch.rand(H, generator=gen) * 2 - 0.5, B=r(rows, G, N).to(dtype), C=r(rows, G, N).to(dtype),
                D=r(H), dt_bias=r(H) * 0.5 - 2)


def _step(K, inp, slots, limit=ssd.NO_DT_LIMIT):
    pool = inp["pool"].clone()
    y = K.ssm_decode(pool, slots, inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"], inp["dt_bias"], limit)
    return y, pool


@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)],
                         ids=["fp32", "bf16-state-fp32", "bf16", "fp16-state-fp32"])
@pytest.mark.parametrize("limit", [ssd.NO_DT_LIMIT, (0.05, 1.5)], ids=["no-limit", "dt-limit"])
def test_indexed_slots_match_reference(mamba_ops, dtype, state_dtype, limit):
    inp = _inputs(3, dtype, state_dtype)
    slots = torch.tensor([4, 0, 2])
    y1, p1 = _step(_fused(mamba_ops), inp, slots, limit)
    y2, p2 = _step(Kernels("reference", "cpu"), inp, slots, limit)
    assert y1.dtype == dtype and p1.dtype == state_dtype
    torch.testing.assert_close(y1.float(), y2.float(), **TOL[dtype])
    torch.testing.assert_close(p1.float(), p2.float(), **TOL[state_dtype])
    untouched = [1, 3, 5, 6]
    assert torch.equal(p1[untouched], inp["pool"][untouched])


def test_padding_rows_write_only_the_dummy_slot(mamba_ops):
    """A static-decode bucket: 2 real rows then 3 padding rows, all on the dummy slot (S - 1)."""
    inp = _inputs(5, torch.float32, torch.float32, seed=1)
    dummy = S - 1
    y1, p1 = _step(_fused(mamba_ops), inp, torch.tensor([3, 1, dummy, dummy, dummy]))
    real = {k: (v[:2] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    y2, p2 = _step(Kernels("reference", "cpu"), real, torch.tensor([3, 1]))
    torch.testing.assert_close(y1[:2], y2, **TOL[torch.float32])
    torch.testing.assert_close(p1[:dummy], p2[:dummy], **TOL[torch.float32])
    assert torch.equal(p1[[0, 2, 4, 5]], inp["pool"][[0, 2, 4, 5]])


def test_slice_of_consecutive_slots_equals_indices(mamba_ops):
    inp = _inputs(3, torch.float32, torch.float32, seed=2)
    K = _fused(mamba_ops)
    y1, p1 = _step(K, inp, slice(2, 5))
    y2, p2 = _step(K, inp, torch.tensor([2, 3, 4]))
    assert torch.equal(y1, y2) and torch.equal(p1, p2)
    y3, p3 = _step(Kernels("reference", "cpu"), inp, slice(2, 5))
    torch.testing.assert_close(y1, y3, **TOL[torch.float32])
    torch.testing.assert_close(p1, p3, **TOL[torch.float32])


def test_kernel_without_state_batch_indices_gathers(mamba_ops):
    """An older selective_state_update (no state_batch_indices): gather the slots' states, update, scatter."""
    real = mamba_ops.selective_state_update

    def old_ssu(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
        return real(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)

    K = _fused(mamba_ops, old_ssu)
    assert not K.ssm_decode_indexed and K.report["ssm_decode"].endswith("+gather")
    inp = _inputs(3, torch.float32, torch.float32, seed=3)
    slots = torch.tensor([5, 1, 3])
    y1, p1 = _step(K, inp, slots, (0.05, 1.5))
    y2, p2 = _step(Kernels("reference", "cpu"), inp, slots, (0.05, 1.5))
    torch.testing.assert_close(y1, y2, **TOL[torch.float32])
    torch.testing.assert_close(p1, p2, **TOL[torch.float32])


def _address_space(elements: int) -> torch.Tensor:
    """(elements,) fp32 over an anonymous MAP_NORESERVE mapping: address space only; a page gets memory when
    first touched (the kernel and this test touch a few)."""
    import mmap

    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value
    return torch.frombuffer(mmap.mmap(-1, elements * 4, flags=flags), dtype=torch.float32)


def test_slot_offset_past_int32(mamba_ops):
    """Slot 4,096 of a pool with the micro's slot stride (64 x 64 x 128 = 2^19 elements) starts 2^31 elements
    in, where an int32 index x stride wraps to -2^31 (the kernel multiplies in the index's type). The pool is a
    strided view into 16 GiB of address space, 2^31 elements from its start: a wrapped offset lands on that
    start (marked with 7s) instead of segfaulting, and a few pages are all that is ever touched."""
    stride = 64 * 64 * 128
    far = 2**31 // stride  # 4096
    space = _address_space(2**32 + stride)
    pool = space[2**31:].as_strided((far + 1, H, P, N), (stride, P * N, N, 1))
    gen = torch.Generator().manual_seed(4)
    pool[0], pool[far] = torch.randn(H, P, N, generator=gen), torch.randn(H, P, N, generator=gen)
    space[:H * P * N] = 7.0
    inp = _inputs(2, torch.float32, torch.float32, seed=5)
    inp["pool"] = torch.stack([pool[0], pool[far]])  # the same two states in a small pool
    y1 = _fused(mamba_ops).ssm_decode(pool, torch.tensor([far, 0]), inp["x"], inp["dt"], inp["A"], inp["B"],
                                      inp["C"], inp["D"], inp["dt_bias"], ssd.NO_DT_LIMIT)
    y2, p2 = _step(Kernels("reference", "cpu"), inp, torch.tensor([1, 0]))
    torch.testing.assert_close(y1, y2, **TOL[torch.float32])
    torch.testing.assert_close(pool[far], p2[1], **TOL[torch.float32])
    torch.testing.assert_close(pool[0], p2[0], **TOL[torch.float32])
    assert bool((space[:H * P * N] == 7.0).all())  # nothing written where an int32 offset wraps to
