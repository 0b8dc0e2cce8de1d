"""mamba-ssm's real SSD chunk scan (mamba_chunk_scan_combined) through Kernels.ssd_prefill vs model/network/ssd.py.

fp32 and fp16 only: bf16 tl.dot is wrong in triton 3.7.1's interpreter. fp32 tl.dot is exact there (no TF32).
"""

from __future__ import annotations

import pytest
import torch

from model.network import ssd
from model.network.fused_ops import FusedOps
from model.network.kernels import Kernels
from model.network.packed import Packed

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=1e-2, rtol=1e-2)}


def _kernels(mamba_ops, calls=None):
    scan = mamba_ops.mamba_chunk_scan_combined
    if calls is not None:
        def scan(*a, _f=mamba_ops.mamba_chunk_scan_combined, **kw):
            calls.append(kw)
            return _f(*a, **kw)
    K = Kernels("auto", "cpu", fused=FusedOps(mamba_chunk_scan_combined=scan))
    assert K.report["ssd_prefill"] == "fused:mamba_chunk_scan_combined"
    return K


def _inputs(b, seqlen, h, g, p=16, n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    # upstream-like scales: B / 5, softplus(dt + bias) ~ 0.1 (small dt keeps exp(dt A) away from 0)
    return dict(x=r(b, seqlen, h, p), dt=r(b, seqlen, h), A=-torch.rand(h, generator=gen) * 2 - 0.5,
                B=r(b, seqlen, g, n) / 5, C=r(b, seqlen, g, n), D=r(h), dt_bias=r(h) * 0.5 - 2,
                initial_states=r(b, h, p, n) * 0.5)


def _close(a, b, dtype=torch.float32):
    torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])


@pytest.mark.parametrize("seqlen,chunk,h,g,dtype,limit", [
    (1, 16, 4, 1, torch.float32, ssd.NO_DT_LIMIT),  # one token, inside chunk 0
    (40, 16, 4, 1, torch.float32, (0.05, 1.5)),  # 2 full chunks + 8, dt clamped
    (33, 32, 4, 2, torch.float32, ssd.NO_DT_LIMIT),  # 2 groups: B, C shared by 2 heads each
    (23, 16, 4, 1, torch.float16, (0.05, 1.5)),
], ids=["1tok", "40tok-dt-limit", "33tok-2groups-chunk32", "23tok-fp16"])
def test_scan_with_initial_states_matches_reference(mamba_ops, seqlen, chunk, h, g, dtype, limit):
    inp = _inputs(2, seqlen, h, g)
    low = {k: (v.to(dtype) if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    args = lambda d: (d["x"], d["dt"], d["A"], d["B"], d["C"], chunk, d["D"], d["dt_bias"],  # noqa: E731
                      d["initial_states"].clone(), limit)
    y1, s1 = _kernels(mamba_ops).ssd_prefill(*args(low))
    y2, s2 = Kernels("reference", "cpu").ssd_prefill(*args(low))
    assert y1.dtype == dtype and s1.dtype == torch.float32
    _close(y1, y2, dtype)
    _close(s1, s2, dtype)
    if seqlen > 1:  # the initial state matters (a test with zero states would pass without it)
        y0, _ = Kernels("reference", "cpu").ssd_prefill(*args({**low, "initial_states": 0 * low["initial_states"]}))
        assert (y0.float() - y2.float()).abs().max() > 1e-2


def test_strided_views_as_the_network_builds_them(mamba_ops):
    """x, B, C are views of the conv output split per channel group and dt a view of in_proj's output, as in
    MambaMixer (one sequence: Packed.pad is a view); the kernel reads their strides."""
    h, p, g, n, L = 4, 16, 1, 16, 37
    inp = _inputs(1, L, h, g)
    conv_out = torch.cat([inp["x"].flatten(2), inp["B"].flatten(2), inp["C"].flatten(2)], -1)  # (1, L, conv_dim)
    proj = torch.cat([torch.randn(1, L, 8), inp["dt"], torch.randn(1, L, 3)], -1)  # dt between other outputs
    x, B, C = conv_out.split([h * p, g * n, g * n], dim=-1)
    x, B, C = x.unflatten(-1, (h, p)), B.unflatten(-1, (g, n)), C.unflatten(-1, (g, n))
    dt = proj[..., 8:8 + h]
    assert not any(t.is_contiguous() for t in (x, B, C, dt))
    pk = Packed.build([0], [5], [L], [[0] * 8], 16, 0, "cpu")  # continued: the initial state is used
    args = (x, dt, inp["A"], B, C, 16, inp["D"], inp["dt_bias"], inp["initial_states"], ssd.NO_DT_LIMIT, pk)
    y1, s1 = _kernels(mamba_ops).ssd_prefill(*args)
    y2, s2 = Kernels("reference", "cpu").ssd_prefill(*args)
    assert y1.shape == (L, h, p)
    _close(y1, y2)
    _close(s1, s2)


@pytest.mark.parametrize("starts,lengths,limit", [
    ([0, 0, 0], [5, 37, 20], ssd.NO_DT_LIMIT),  # all fresh; the first ends inside chunk 0
    ([0, 7, 0, 3], [20, 9, 33, 16], (0.05, 1.5)),  # fresh and continued rows interleaved
    ([0, 0], [16, 16], ssd.NO_DT_LIMIT),  # fresh, both exactly one chunk (boundaries on the chunk grid)
    ([4, 9], [13, 30], ssd.NO_DT_LIMIT),  # continued only, uneven
    ([3, 5], [16, 16], ssd.NO_DT_LIMIT),  # continued only, equal: one batched call
], ids=["fresh", "mixed-dt-limit", "fresh-on-chunk-grid", "continued", "continued-equal"])
def test_packed_rows_match_reference(mamba_ops, starts, lengths, limit):
    """A packed prefill's padded rows: fresh rows in ONE varlen call (seq_idx / cu_seqlens, per-sequence
    states), continued rows one call each from their states; y comes back in packed order."""
    b, L, h = len(lengths), max(lengths), 4
    inp = _inputs(b, L, h, 1, seed=sum(lengths))
    fresh = [i for i, s in enumerate(starts) if s == 0]
    inp["initial_states"][fresh] = 0  # the runner zeroes a fresh slot
    pk = Packed.build(list(range(b)), starts, lengths, [[0] * 8] * b, 16, 0, "cpu")
    calls = []
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 16, inp["D"], inp["dt_bias"],
            inp["initial_states"], limit, pk)
    y1, s1 = _kernels(mamba_ops, calls).ssd_prefill(*args)
    y2, s2 = Kernels("reference", "cpu").ssd_prefill(*args)
    assert y1.shape == (sum(lengths), h, 16) and s1.shape == (b, h, 16, 16)
    _close(y1, y2)
    _close(s1, s2)
    varlen = [c for c in calls if c.get("cu_seqlens") is not None]
    continued = b - len(fresh)
    assert len(varlen) == (len(fresh) > 1)
    if varlen:
        assert varlen[0]["cu_seqlens"].tolist() == [0, *torch.tensor(lengths)[fresh].cumsum(0).tolist()]
        assert varlen[0]["initial_states"] is None and varlen[0]["return_varlen_states"]
    batched = continued == b and len(set(lengths)) == 1
    assert len(calls) == (len(fresh) > 0) + (1 if batched else continued)
