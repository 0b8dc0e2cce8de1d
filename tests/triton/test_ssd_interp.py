"""Smoke test of the interpreter harness: the real SSD chunk scan through Kernels vs model/ssd.py."""

from __future__ import annotations

import torch

from model import ssd
from model.kernels import FusedOps, Kernels


def test_real_ssd_scan_matches_reference(mamba_ops):
    fused = Kernels("auto", "cpu", fused=FusedOps(mamba_chunk_scan_combined=mamba_ops.mamba_chunk_scan_combined))
    assert fused.report["ssd_prefill"].startswith("fused:")
    ref = Kernels("reference", "cpu")
    gen = torch.Generator().manual_seed(0)
    b, seqlen, h, p, g, n = 2, 40, 4, 16, 1, 16
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x, dt, B, C = r(b, seqlen, h, p), r(b, seqlen, h), r(b, seqlen, g, n) / 5, r(b, seqlen, g, n)
    A, D, dt_bias, init = -torch.rand(h, generator=gen) - 0.5, r(h), r(h) * 0.5 - 2, r(b, h, p, n) * 0.5
    y1, s1 = fused.ssd_prefill(x, dt, A, B, C, 16, D, dt_bias, init.clone(), ssd.NO_DT_LIMIT)
    y2, s2 = ref.ssd_prefill(x, dt, A, B, C, 16, D, dt_bias, init.clone(), ssd.NO_DT_LIMIT)
    torch.testing.assert_close(y1, y2, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(s1, s2, atol=2e-5, rtol=2e-5)
