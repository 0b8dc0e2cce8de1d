"""Every Triton kernel the CUDA path launches compiles for the four SageMaker GPU architectures, through our
own call sites at the full-size micro's shapes (bench/compile_report.py): no kernel without a usable config,
no deterministic pick over the shared memory limit, none of our kernels over it, no register spills."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench import compile_report as cr

# What model/network/kernels.py's fused path launches (causal-conv1d is CUDA C++, compiled elsewhere)
KERNELS = {
    "model.network.paged_attention:_paged_decode_kernel", "model.network.paged_attention:_merge_kernel",
    "mamba_ssm.ops.triton.selective_state_update:_selective_scan_update_kernel",
    "mamba_ssm.ops.triton.ssd_chunk_state:_chunk_cumsum_fwd_kernel",
    "mamba_ssm.ops.triton.ssd_chunk_state:_chunk_state_fwd_kernel",
    "mamba_ssm.ops.triton.ssd_chunk_state:_chunk_state_varlen_kernel",
    "mamba_ssm.ops.triton.ssd_state_passing:_state_passing_fwd_kernel",
    "mamba_ssm.ops.triton.ssd_bmm:_bmm_chunk_fwd_kernel", "mamba_ssm.ops.triton.ssd_chunk_scan:_chunk_scan_fwd_kernel",
    "mamba_ssm.ops.triton.layer_norm:_layer_norm_fwd_1pass_kernel",
    "mamba_ssm.ops.triton.layernorm_gated:_layer_norm_fwd_1pass_kernel",
    "mamba_ssm.ops.triton.k_activations:_swiglu_fwd_kernel",
}
AFTER_WARMUP = "compiled after warmup"  # tests/compile/test_warmup_compiles.py's part of the problems


# cold (nothing in TRITON_CACHE_DIR): every variant through ptxas, ~10 CPU-minutes for four architectures
pytestmark = pytest.mark.timeout(3600)


def test_every_kernel_compiles_for_every_architecture_within_its_limits(compile_report):
    assert set(compile_report["archs"]) == {"sm_80", "sm_86", "sm_89", "sm_90"}
    for arch, r in compile_report["archs"].items():
        for pass_name in ("serving", "deterministic"):
            assert set(r["kernels"][pass_name]) == KERNELS, (arch, pass_name)
        # the deterministic pass compiles one config per autotuned kernel, all loadable (else it raised)
        assert all(k["usable"] == k["variants"] for k in r["kernels"]["deterministic"].values()), arch
    assert [p for p in cr.problems(compile_report) if AFTER_WARMUP not in p] == []


@pytest.mark.triton36  # opt-in (make test COMPILE_TRITON36=1): triton 3.6.0, the CUDA image's, ~7 CPU-minutes cold
def test_the_same_with_the_cuda_images_triton(tmp_path):
    """The GPU machine and the CUDA image run triton 3.6.0: the same report with it, in a subprocess (installed
    once under /var/tmp with pip --target, 640 MB)."""
    out = tmp_path / "triton36.json"
    run = subprocess.run([sys.executable, "-m", "bench.compile_report", "--triton", "3.6.0", "--out", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
