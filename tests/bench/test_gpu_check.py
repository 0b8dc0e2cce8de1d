"""make gpu-check on CPU, up to the first CUDA call: the GPU targets never use the CPU .venv, the
causal-conv1d build plan (one architecture, forward + update only), its fallback and reuse, the carried
wheels leaving the machine's own pytest alone, and a dry run of bench/gpu_check.py with its step plan."""

from __future__ import annotations

import json
import os
import re
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


def test_conv_build_plans_one_architecture_forward_and_update_only(tmp_path):
    """causal_conv1d_bwd.cu alone took ~266 s of nvcc for sm_90 (the whole check's budget); inference never
    runs it. The binding is the sdist's own, minus the backward, generated in the build folder."""
    from bench import conv_build

    src = conv_build.unpack(_sdist(), tmp_path)
    p = conv_build.plan(src, tmp_path, "90", "/usr/local/cuda")
    cu = [c for c in p["compile"] if c[0].endswith("nvcc")]
    assert [Path(c[2]).name for c in p["compile"]] == ["causal_conv1d_fwd.cu", "causal_conv1d_update.cu",
                                                       conv_build.BINDING]
    assert not [a for c in [*p["compile"], p["link"]] for a in c if "bwd" in a]
    for c in cu:
        assert [a for a in c if "sm_" in a] == ["arch=compute_90,code=sm_90"] and c[2].endswith(".cu")
        assert "-std=" + conv_build.cxx_std() in c
    assert all(Path(c[2]).exists() for c in p["compile"])  # the sdist's sources + the generated binding
    assert Path(p["compile"][2][2]).parent == tmp_path  # generated in the build folder, never in the sdist
    assert p["target"].name == "causal_conv1d_cuda" + sysconfig.get_config_var("EXT_SUFFIX")
    assert "-lc10_cuda" in p["link"] and "-ltorch_python" in p["link"]


def test_the_binding_loses_the_backward_and_nothing_else(tmp_path):
    from bench import conv_build

    src = conv_build.unpack(_sdist(), tmp_path)
    orig = (src / "csrc" / "causal_conv1d.cpp").read_text()
    cut = conv_build.inference_binding(src, tmp_path).read_text()
    gone = set(orig.splitlines()) - set(cut.splitlines())
    assert 'm.def("causal_conv1d_bwd", &causal_conv1d_bwd, "Causal conv1d backward");' in {g.strip() for g in gone}
    assert not re.search(r"_bwd_cuda\s*<", cut) and "causal_conv1d_bwd(" not in cut.replace("//", "")
    # the forward, the update and their bindings are untouched, line for line
    for name in ("causal_conv1d_fwd", "causal_conv1d_update"):
        body = re.search(rf"^void\s+{name}\(.*?^}}", orig, re.S | re.M).group(0)
        assert body in cut and f'm.def("{name}"' in cut
    assert len(orig) - len(cut) > 5000  # the whole backward function went
    # an sdist whose binding changed shape stops the build with a reason, instead of building the wrong thing
    (src / "csrc" / "causal_conv1d.cpp").write_text(orig.replace("causal_conv1d_bwd(", "conv_bwd("))
    with pytest.raises(ValueError, match="causal_conv1d_bwd"):
        conv_build.inference_binding(src, tmp_path)


def test_an_earlier_build_is_reused_and_a_failed_one_leaves_nothing_importable(tmp_path):
    from bench import conv_build

    site = tmp_path / "site"
    site.mkdir()
    target = site / ("causal_conv1d_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    target.write_bytes(b"built earlier")
    (site / conv_build.STAMP).write_text(json.dumps(conv_build._stamp(_sdist(), "90")))
    res = conv_build.build(_sdist(), site, tmp_path / "work", "90", timeout_s=60)
    assert res["ok"] and res["cached"] and res["seconds"] < 5
    res = conv_build.build(_sdist(), site, tmp_path / "work", "80", timeout_s=2)  # another architecture: rebuilt
    assert not res["ok"] and not target.exists() and not (site / conv_build.STAMP).exists()


def test_carried_wheels_never_shadow_the_machines_own(tmp_path):
    """pytest, its plugins' dependencies and einops are unpacked only where the machine has none; mamba-ssm's
    Triton-only build always (it is what the check tests)."""
    from bench.gpu_check import install_wheels

    machine = {"pytest": "8.3.5", "pluggy": "1.5.0", "packaging": "24.2", "pygments": "2.19.1", "iniconfig": "2.0.0",
               "mamba_ssm": "2.2.4"}
    res = install_wheels(WHEELS, tmp_path, machine.get)
    assert res["machine_has"] == {k: v for k, v in machine.items() if k != "mamba_ssm"}
    assert {w.split("-")[0] for w in res["wheels"]} == {"mamba_ssm", "einops", "pytest_timeout"}
    assert not (tmp_path / "pytest").exists() and not (tmp_path / "_pytest").exists()
    assert (tmp_path / "mamba_ssm").is_dir() and (tmp_path / "einops").is_dir()
    everything = install_wheels(WHEELS, tmp_path / "bare", lambda dist: None)  # a bare machine: all of them
    assert len(everything["wheels"]) == len(list(WHEELS.glob("*.whl")))


def test_conv_build_failure_or_timeout_is_reported_not_raised(tmp_path):
    from bench import conv_build

    res = conv_build.build(_sdist(), tmp_path / "site", tmp_path / "work", "90", timeout_s=2)
    # no GPU toolchain -> "cannot build"; a toolchain without CUDA torch headers -> compile error or timeout
    assert res["ok"] is False and res["reason"] and res["seconds"] < 30
    assert not (tmp_path / "site" / "causal_conv1d").exists()


@pytest.mark.slow
def test_dry_run_writes_the_reports(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    p = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", str(out), "--work", str(work)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, GPU_PY=sys.executable))
    s = json.loads((out / "gpu-check.json").read_text())
    assert p.returncode == 0, (p.stdout[-3000:], (out / "gpu-check.log").read_text()[-3000:])
    # the step plan comes first, with its estimate inside the budget
    assert p.stdout.startswith("gpu-check step plan") and "STALE" not in p.stdout
    assert [r["step"] for r in s["plan"]] == ["environment", "install", "conv_build", "probe", "tests_gpu", "bench"]
    assert s["plan_estimate_s"] <= 300 and not s["plan_stale"]
    steps = s["steps"]
    assert any(w.startswith("mamba_ssm-") for w in steps["install"]["wheels"])
    assert "pytest" in steps["install"]["machine_has"]  # this .venv has its pytest: not shadowed
    assert not any(w.startswith("pytest-") for w in steps["install"]["wheels"])
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
    assert "code=sm_90" in log and "tests/gpu" in log and s["seconds"] < 300
    assert "causal_conv1d_bwd" not in log  # nothing of the backward is compiled
