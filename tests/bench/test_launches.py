"""bench/launches.py: the decode step's launch count on the full-size layer pattern (real wrappers, Triton
launches intercepted) stays within the issue's budget, and what each launch is."""

from __future__ import annotations

import pytest

from bench import launches


@pytest.fixture(scope="module")
def report():
    return launches.launches_report()


def test_decode_step_launches_within_target(report):
    after = report["after"]
    assert report["widths_agree"]  # the count does not depend on the shrunk widths
    assert after["launches"] <= launches.LAUNCH_TARGET < report["before"]["launches"]
    ops = after["by_op"]
    # 36 Mamba layers x (in_proj, out_proj, 2 MLP) + 4 attention layers x (q, k, v, o, 2 MLP); no lm_head
    assert ops["mm"] == 36 * 4 + 4 * 6 == after["gemm"]
    assert ops["triton:_layer_norm_fwd_1pass_kernel"] == 2 * 40 + 1 + 36  # 2 add_norms per layer, final, gated
    assert ops["triton:_swiglu_fwd_kernel"] == 40
    assert ops["triton:_selective_scan_update_kernel"] == ops["cuda:causal_conv1d_update"] == 36
    assert ops["triton:_paged_decode_kernel"] == ops["triton:_merge_kernel"] == 4  # 1K context: split-K
    # no per-layer casts, copies or recomputed constants: one int32 slot cast per step, no clone/exp/neg
    assert ops.get("_to_copy", 0) <= 1 and not {"clone", "exp", "neg", "pow", "rsqrt"} & set(ops)
    assert ops["index_copy_"] == 8  # the new token's K and V, per attention layer


def test_state_kernels_alone_are_far_over(report):
    """Without the fused norms / SwiGLU / paged attention the unfused bf16 norms alone blow the budget."""
    assert report["state_kernels_only_now"]["launches"] > 3 * launches.LAUNCH_TARGET


def test_count_leaves_sys_modules_as_found():
    """transformers imported after a count must not find the bare mamba_ssm package model.kernels may
    register (it would bind mamba-ssm's Triton kernels for its CPU forward)."""
    import sys

    def mamba():
        return {k: v for k, v in sys.modules.items() if k.startswith("mamba_ssm")}

    before = mamba()
    launches.count_decode(launches.micro_arch(1)[0], fused="state", context=40)
    assert mamba() == before


def test_kv_report_meets_target():
    kv = launches.kv_report()
    assert kv["meets_target"] and kv["paged_ratio"] <= 1.05 and 2.9 < kv["gather_ratio"] < 3.1
    assert kv["mixed_one_long_rest_2k"]["gather_ratio"] > 10 * kv["mixed_one_long_rest_2k"]["paged_ratio"]
