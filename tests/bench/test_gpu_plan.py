"""The step plan of make gpu-check and its time estimate (bench/gpu_plan.py over the measurements in
bench/results/gpu-check-estimate.json), and the compile-only Triton harness the measurements use."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from bench import gpu_plan


@pytest.fixture(scope="module")
def measured():
    return gpu_plan.load()


def test_the_check_fits_five_minutes_on_an_h100(measured):
    """One run inside 5 of the session's 15 device minutes leaves room for the machine's start and a rerun."""
    rows = gpu_plan.plan(measured)
    assert [r["step"] for r in rows] == ["environment", "install", "conv_build", "probe", "tests_gpu", "bench"]
    assert sum(r["estimate_s"] for r in rows) <= gpu_plan.BUDGET_S == 300
    assert all(r["estimate_s"] > 0 for r in rows)
    assert not gpu_plan.stale(measured)  # measured for the sources, benchmark and kernels the check runs


def test_the_measurements_are_of_what_the_check_builds(measured, tmp_path):
    conv = measured["conv"]
    assert conv["arch"] == "sm_90" and "13.0" in conv["nvcc"]
    assert sorted(u["src"] for u in conv["units"]) == sorted(gpu_plan.SOURCES_BUILT)  # no causal_conv1d_bwd.cu
    # the binding object needs (nm -u) exactly the kernels the two built sources instantiate: it loads
    # without a backward
    from bench import conv_build
    from tests.bench.test_gpu_check import _sdist

    src = conv_build.unpack(_sdist(), tmp_path)
    defined = {f"void {name}<{', '.join(t.strip().replace('at::', 'c10::') for t in args.split(','))}>"
               for rel in conv_build.SOURCES
               for name, args in re.findall(r"^template void (\w+)<([\w:, ]+)>\(", (src / rel).read_text(), re.M)}
    assert len(defined) == 27 and set(conv["binding_undefined_kernels"]) == defined
    tri = measured["triton"]
    assert tri["target"].startswith("cuda sm_90") and tri["bench_args"] == gpu_plan.BENCH
    assert tri["hf_uses_mamba_kernels"] is True  # as on the GPU machine: HF's baseline compiles its own variants
    for name in ("tests_gpu", "bench", "hf"):
        assert tri["workloads"][name]["variants"] == sum(tri["workloads"][name]["by_kernel"].values())


def test_the_benchmark_is_bounded():
    w = gpu_plan.bench_work()
    assert w["captures"] == 25 and w["hf_tokens"] == 21  # was 40 captures and 69 HF tokens (+ a 128 sweep)
    assert gpu_plan.BENCH_ARGS[:2] == ["--prompt", "128"] and "--hf-steps" in gpu_plan.BENCH_ARGS


def test_a_changed_check_makes_the_estimate_stale(measured):
    assert gpu_plan.stale(measured, {**gpu_plan.BENCH, "max_batch": 128})
    m = copy.deepcopy(measured)
    m["conv"]["units"].append({"src": "causal_conv1d_bwd.cu", "cpu_s": 266.0, "wall_s": 266.0})
    assert gpu_plan.stale(m)
    assert sum(r["estimate_s"] for r in gpu_plan.plan(m)) > 300  # the backward alone would not fit


def test_render_names_every_step_and_the_total(measured):
    text = gpu_plan.render(gpu_plan.plan(measured), measured)
    assert text.startswith("gpu-check step plan") and "total" in text and "STALE" not in text
    assert all(f"\n{s} " in text for s in ("install", "conv_build", "probe", "tests_gpu", "bench"))


def test_compile_only_builds_real_sm90_code_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from bench.compile_only import compile_only

    run, active, x = JITFunction.run, driver._active, torch.zeros(64)
    with compile_only(90) as compiles:
        k = _add_one[(1,)](x, 64, BLOCK=64)
        _add_one[(1,)](x, 48, BLOCK=64)  # 48 and 64 are both multiples of 16: the same variant
        _add_one[(1,)](x, 7, BLOCK=64)  # another specialization
    assert [c[0] for c in compiles] == ["_add_one", "_add_one"] and all(c[1] > 0 for c in compiles)
    assert k.metadata.target.arch == 90 and k.asm["cubin"]  # real sm_90 machine code, from Triton's ptxas
    assert x.sum() == 0  # compiled, never run
    assert JITFunction.run is run and driver._active is active  # restored


import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _add_one(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)
