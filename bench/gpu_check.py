"""One command for a CUDA machine: install the carried kernels, run tests/gpu and the GPU benchmark, and
write JSON + a log into OUT (`bash bench/gpu_check.sh OUT`; `make gpu-check OUT=dir` where make exists).

Needs only torch (a CUDA build), triton, transformers and nvcc there, no network, no make: it installs from
the files `make gpu-wheels` puts in build/wheels (pure-Python wheels unpacked onto PYTHONPATH, no pip: the
mamba-ssm Triton-only build always; einops, pytest and its dependencies, pytest-timeout only where the machine
has no such distribution, so its own pytest and plugins are never shadowed; the causal-conv1d sdist, forward
and update only, compiled by bench/conv_build.py for the local GPU and reused by a rerun; when that fails or
runs out of time, the conv ops fall back to the torch conv and every report says so). Every step runs with
MAMBA_DETERMINISTIC=1 (one autotune config per mamba-ssm kernel: no tuning runs) and one Triton cache under
--work (a rerun compiles nothing again); the benchmark is bounded (bench/gpu_plan.py BENCH). Steps, each
under a cap inside --budget seconds (default 300, i.e. 5 minutes; bench/gpu_plan.py estimates each step from
measurements):

  environment -> install -> causal-conv1d build -> kernel import probe -> tests/gpu -> gpu_bench

  --installed   the kernels are already installed (the CUDA image: `make test-gpu-image`)
  --dry-run     on a CPU: prints the step plan with its time estimate, then every step up to the first CUDA
                call (the build is planned, not run; tests/gpu collects and skips; the benchmark smoke-runs
                a tiny config on CPU) - tests/bench/test_gpu_check.py

Outputs: OUT/gpu-check.json (summary), OUT/gpu-check.log (every command and its output), OUT/tests-gpu.xml
(junit), OUT/gpu-bench.json and OUT/gpu-<gpu>-<date>.json (bench + tests summary, for bench/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import conv_build, gpu_plan  # noqa: E402

CAPS = {"conv_build": 90, "probe": 60, "tests": 120, "bench": 150}  # seconds, each inside --budget
ALWAYS = ("mamba_ssm",)  # carried wheels unpacked even where the machine has the distribution: under test


class Check:
    def __init__(self, out: Path, budget: float) -> None:
        self.out, self.t0, self.budget = out, time.monotonic(), budget
        self.log_f = open(out / "gpu-check.log", "w")  # noqa: SIM115 - kept open for the run
        self.summary: dict = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "steps": {}}

    def log(self, msg: str) -> None:
        self.log_f.write(msg.rstrip() + "\n")
        self.log_f.flush()

    def left(self, cap: float) -> float:
        return max(1.0, min(cap, self.budget - (time.monotonic() - self.t0)))

    def run(self, name: str, cmd: list[str], cap: float, env: dict) -> subprocess.CompletedProcess | None:
        """A step as a subprocess (its own timeout); output into the log. None when it timed out."""
        t, limit = time.monotonic(), self.left(cap)
        self.log(f"\n== {name} (cap {limit:.0f}s)\n$ {shlex.join(cmd)}")
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired as e:
            self.log(f"{e.stdout or ''}{e.stderr or ''}\n!! {name}: timed out after {limit:.0f}s")
            self.step(name, ok=False, seconds=round(time.monotonic() - t, 1), reason=f"timed out ({limit:.0f}s)")
            return None
        self.log(p.stdout + p.stderr + f"\n-> exit {p.returncode}")
        self.step(name, ok=p.returncode == 0, seconds=round(time.monotonic() - t, 1), exit=p.returncode)
        return p

    def step(self, name: str, **kw) -> None:
        self.summary["steps"][name] = kw


def environment(dry: bool) -> dict:
    import torch

    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda, "nvcc": conv_build.find_cuda_home()}
    for mod in ("triton", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            env[mod] = f"missing ({type(e).__name__})"
    if not dry:  # the first CUDA calls
        env["cuda_available"] = torch.cuda.is_available()
        if env["cuda_available"]:
            env["device"] = torch.cuda.get_device_name(0)
            major, minor = torch.cuda.get_device_capability(0)
            env["capability"] = f"{major}{minor}"
    return env


def installed_dists(env: dict) -> dict[str, str]:
    """Distributions the steps' python sees (normalised name -> version), without the carried site."""
    code = ("import importlib.metadata as m, json; print(json.dumps({d.metadata['Name'].lower().replace('-', '_'): "
            "d.version for d in m.distributions() if d.metadata['Name']}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def install_wheels(wheels: Path, site: Path, have=lambda dist: None) -> dict:
    """Unpack the carried pure-Python wheels into `site` (no pip, no network): mamba-ssm always, the others
    only where have(distribution) says the machine lacks them (-> its version, or None)."""
    names, present = [], {}
    for whl in sorted(wheels.glob("*.whl")):
        if not whl.name.endswith("-py3-none-any.whl"):
            raise RuntimeError(f"{whl.name} is not a pure-Python wheel (py3-none-any)")
        dist = whl.name.split("-")[0].lower()
        if dist not in ALWAYS and (version := have(dist)):
            present[dist] = version  # the machine's own copy stays in charge
            continue
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
        names.append(whl.name)
    if not any(n.startswith("mamba_ssm-") for n in names):
        raise RuntimeError(f"no mamba_ssm-*-py3-none-any.whl in {wheels} (run `make gpu-wheels`)")
    return {"wheels": names, "machine_has": present}


def junit_counts(path: Path) -> dict:
    if not path.exists():
        return {}
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None]
    return counts


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower().removeprefix("nvidia ")).strip("-") or "gpu"


def show_plan(c: Check, s: dict) -> None:
    """The step plan and its estimate for an H100 (bench/gpu_plan.py), before the run; in the summary too."""
    try:
        measured = gpu_plan.load()
        s["plan"] = rows = gpu_plan.plan(measured)
    except Exception as e:  # noqa: BLE001 - informational: never stops the check
        s["plan_error"] = f"{type(e).__name__}: {e}"
        return
    s["plan_estimate_s"] = round(sum(r["estimate_s"] for r in rows), 1)
    s["plan_stale"] = gpu_plan.stale(measured)
    text = gpu_plan.render(rows, measured)
    print(text, flush=True)
    c.log(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the JSON reports and the log")
    ap.add_argument("--wheels", type=Path, default=ROOT / "build" / "wheels")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu-check"), help="scratch (site, conv build)")
    ap.add_argument("--installed", action="store_true", help="use the installed kernels (CUDA image)")
    ap.add_argument("--dry-run", action="store_true", help="CPU: every step up to the first CUDA call")
    ap.add_argument("--arch", default=None, help="GPU architecture for the conv build (default: the GPU's)")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds for the whole run (default {gpu_plan.BUDGET_S}; a CPU dry run: 600)")
    ap.add_argument("--conv-timeout", type=float, default=CAPS["conv_build"])
    ap.add_argument("--bench-args", default="", help="extra arguments for bench/gpu_bench.py")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    c = Check(args.out, args.budget or (600.0 if args.dry_run else float(gpu_plan.BUDGET_S)))
    s = c.summary
    s["mode"] = "dry-run" if args.dry_run else ("installed" if args.installed else "carried")
    show_plan(c, s)
    s["environment"] = env_info = environment(args.dry_run)
    c.step("environment", ok=True, seconds=round(time.monotonic() - c.t0, 1))
    c.log(json.dumps(env_info))
    if not args.dry_run and not (env_info["torch_cuda"] and env_info.get("cuda_available")):
        s["error"] = (f"no usable CUDA here (torch {env_info['torch']}, built for CUDA {env_info['torch_cuda']}): "
                      "run this with the CUDA machine's python, not the CPU .venv")
        return finish(c, 2)
    site, work = args.work / "site", args.work / "conv"
    # one Triton cache for every step (tests/gpu's variants serve the benchmark; a rerun compiles nothing)
    base = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONNOUSERSITE="1", MAMBA_DETERMINISTIC="1",
                TRITON_CACHE_DIR=str(args.work / "triton-cache"))
    env = dict(base, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))
    conv = "fused"
    if not args.installed:
        site.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        try:
            t = time.monotonic()
            have = installed_dists(base)
            c.step("install", ok=True, **install_wheels(args.wheels, site, have.get),
                   seconds=round(time.monotonic() - t, 1))
        except Exception as e:  # noqa: BLE001
            c.step("install", ok=False, reason=str(e))
            s["error"] = f"install failed: {e}"
            return finish(c, 1)
        sdists = sorted(args.wheels.glob("causal_conv1d-*.tar.gz"))
        arch = args.arch or env_info.get("capability") or "90"
        if not sdists:
            res = {"ok": False, "reason": f"no causal_conv1d-*.tar.gz in {args.wheels}"}
        elif args.dry_run:
            src = conv_build.unpack(sdists[-1], work)
            plan = conv_build.plan(src, work, arch, env_info["nvcc"] or "/usr/local/cuda")
            c.log("\n== conv_build plan (dry run)\n" + "\n".join(shlex.join(x) for x in [*plan["compile"], plan["link"]]))
            res = {"ok": False, "reason": "dry run: planned, not built", "arch": f"sm_{arch}",
                   "commands": len(plan["compile"]) + 1}
        else:
            res = conv_build.build(sdists[-1], site, work, arch, c.left(args.conv_timeout), c.log)
        c.step("conv_build", **res)
        conv = "fused" if res["ok"] else "torch"
    probe = ("import json, importlib.util; from model.network.fused_ops import load_fused; o = load_fused(); "
             "print(json.dumps({'loaded': [n for n in ('mamba_chunk_scan_combined', 'selective_state_update', "
             "'causal_conv1d_fn', 'causal_conv1d_update') if getattr(o, n)], 'errors': o.errors, "
             "'mamba_ssm': importlib.util.find_spec('mamba_ssm').origin}))")
    p = c.run("probe", [sys.executable, "-c", probe], CAPS["probe"], env)
    if p is not None and p.returncode == 0:
        s["steps"]["probe"].update(json.loads(p.stdout.strip().splitlines()[-1]))
        loaded = s["steps"]["probe"]["loaded"]
        if not args.installed and not s["steps"]["probe"]["mamba_ssm"].startswith(str(site)):
            s["steps"]["probe"].update(ok=False, reason="mamba_ssm was not imported from the carried wheel")
        if "causal_conv1d_fn" not in loaded:
            conv = "torch"
    s["conv"] = conv if conv == "fused" else "torch (causal-conv1d unavailable: the conv ops run the torch reference)"
    tenv = dict(env, GPU_CHECK_CONV=conv)
    c.run("tests_gpu", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/gpu",
                        f"--junitxml={args.out / 'tests-gpu.xml'}"], CAPS["tests"], tenv)
    s["steps"]["tests_gpu"].update(junit_counts(args.out / "tests-gpu.xml"))
    bench_json = args.out / "gpu-bench.json"
    if args.dry_run:
        from tests.tiny_granite import tiny_config

        cfg = work / "tiny_config.json"
        cfg.write_text(json.dumps(tiny_config().to_dict()))
        extra = ["--device", "cpu", "--config", str(cfg), "--steps", "4", "--prompt", "12", "--max-batch", "2"]
    else:
        extra = ["--conv", conv, *gpu_plan.BENCH_ARGS]
    c.run("bench", [sys.executable, "bench/gpu_bench.py", "--out", str(bench_json), *extra,
                    *shlex.split(args.bench_args)], CAPS["bench"], env)
    if bench_json.exists():
        bench = json.loads(bench_json.read_text())
        s["bench"] = {k: bench.get(k) for k in ("device", "kernels", "claimed_path", "error",
                                                "speedup_vs_hf_batch1", "timed_uncaptured_steps")}
        day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        result = {"gpu_check": {k: s[k] for k in ("mode", "environment", "conv")},
                  "tests_gpu": s["steps"]["tests_gpu"], **bench}
        (args.out / f"gpu-{_slug(bench.get('device', 'gpu'))}-{day}.json").write_text(json.dumps(result, indent=2))
    ok = all(v.get("ok") for k, v in s["steps"].items() if k != "conv_build")
    return finish(c, 0 if ok else 1)


def finish(c: Check, rc: int) -> int:
    c.summary.update(exit=rc, seconds=round(time.monotonic() - c.t0, 1))
    steps = c.summary["steps"]
    c.summary["seconds_vs_estimate"] = {r["step"]: [steps.get(r["step"], {}).get("seconds"), r["estimate_s"]]
                                        for r in c.summary.get("plan", [])}
    (c.out / "gpu-check.json").write_text(json.dumps(c.summary, indent=2))
    c.log(f"\n== done: exit {rc} in {c.summary['seconds']}s")
    c.log_f.close()
    print(json.dumps({k: v for k, v in c.summary.items() if k not in ("environment", "plan")}, indent=1)[:6000])
    return rc


if __name__ == "__main__":
    sys.exit(main())
