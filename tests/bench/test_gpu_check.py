"""make gpu-check on CPU, up to the first CUDA call: the GPU targets never use the CPU .venv, the
causal-conv1d build plan (one architecture), its fallback, and a dry run of bench/gpu_check.py."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / "build" / "wheels"


def _sdist() -> Path:
    found = sorted(WHEELS.glob("causal_conv1d-*.tar.gz"))
    assert found, "no causal-conv1d sdist in build/wheels: run `make gpu-wheels` (make test does)"
    return found[-1]


def test_gpu_targets_never_run_in_the_cpu_venv():
    """.venv holds CPU torch and no kernels: test-gpu errored and bench-gpu measured the reference path."""
    out = subprocess.run(["make", "-n", "test-gpu", "bench-gpu", "gpu-check"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert ".venv/bin/python" not in out
    assert out.count("torch.version.cuda and torch.cuda.is_available()") == 2  # refuse a CPU-only torch
    assert "bash bench/gpu_check.sh" in out
    guard = subprocess.run(["bash", "bench/gpu_check.sh", "/tmp/x"], cwd=ROOT, capture_output=True, text=True,
                           env={"GPU_PY": str(ROOT / ".venv" / "bin" / "python"), "PATH": "/usr/bin:/bin"})
    assert guard.returncode == 2 and "CPU .venv" in guard.stderr


def test_conv_build_plans_one_architecture(tmp_path):
    from bench import conv_build

    src = conv_build.unpack(_sdist(), tmp_path)
    p = conv_build.plan(src, tmp_path, "90", "/usr/local/cuda")
    cu = [c for c in p["compile"] if c[0].endswith("nvcc")]
    assert len(cu) == 3 and len(p["compile"]) == 4
    for c in cu:
        assert [a for a in c if "sm_" in a] == ["arch=compute_90,code=sm_90"] and c[2].endswith(".cu")
        assert "-std=" + conv_build.cxx_std() in c
    assert all(Path(c[2]).exists() for c in p["compile"])  # the sdist's sources
    assert p["target"].name == "causal_conv1d_cuda" + sysconfig.get_config_var("EXT_SUFFIX")
    assert "-lc10_cuda" in p["link"] and "-ltorch_python" in p["link"]


def test_conv_build_failure_or_timeout_is_reported_not_raised(tmp_path):
    from bench import conv_build

    res = conv_build.build(_sdist(), tmp_path / "site", tmp_path / "work", "90", timeout_s=2)
    # no GPU toolchain -> "cannot build"; a toolchain without CUDA torch headers -> compile error or timeout
    assert res["ok"] is False and res["reason"] and res["seconds"] < 30
    assert not (tmp_path / "site" / "causal_conv1d").exists()


@pytest.mark.slow
def test_dry_run_writes_the_reports(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    p = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(out), "--work", str(work)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    s = json.loads((out / "gpu-check.json").read_text())
    assert p.returncode == 0, (p.stdout[-3000:], (out / "gpu-check.log").read_text()[-3000:])
    steps = s["steps"]
    assert any(w.startswith("mamba_ssm-") for w in steps["install"]["wheels"])
    assert steps["conv_build"]["reason"].startswith("dry run") and steps["conv_build"]["arch"] == "sm_90"
    # the engine's loader imports the carried Triton-only mamba-ssm, not the dev .venv's copy
    assert steps["probe"]["ok"] and steps["probe"]["mamba_ssm"].startswith(str(work / "site"))
    assert set(steps["probe"]["loaded"]) == {"mamba_chunk_scan_combined", "selective_state_update"}
    assert s["conv"].startswith("torch")  # no causal-conv1d: said so
    t = steps["tests_gpu"]
    assert t["ok"] and t["tests"] >= 20 and t["skipped"] == t["tests"]  # collected; CPU: all "needs CUDA"
    assert steps["bench"]["ok"] and s["bench"]["timed_uncaptured_steps"] == 0
    assert s["bench"]["kernels"]["ssd_prefill"] == "reference"
    (result,) = out.glob("gpu-cpu-*.json")
    assert json.loads(result.read_text())["tests_gpu"]["tests"] == t["tests"]
    log = (out / "gpu-check.log").read_text()
    assert "code=sm_90" in log and "tests/gpu" in log and s["seconds"] < 450
