"""Every Triton kernel the CUDA path launches, compiled on this CPU for the four SageMaker GPU architectures
(sm_80 A100 p4d, sm_86 A10G g5, sm_89 L40S g6e, sm_90 H100 p5): shared memory, registers and spills per
kernel per architecture (`make bench`'s "compile" section), and the problems tests/compile fails on.

Per architecture (bench/triton_compile.py compiles for it, bench/meta_serving.py serves the full-width
micro on meta tensors through our call sites), three fresh servers, each `warmup()` then the serving mix:
  serving bf16 / serving fp32   every autotune config (the CUDA image does not set MAMBA_DETERMINISTIC:
                                the autotuner compiles each config and skips those that cannot launch),
                                bf16 and fp32 SSM state
  deterministic                 MAMBA_DETERMINISTIC=1's one config per kernel (what `make gpu-check` runs)
Problems: a warmup or serving step that raises (e.g. OutOfResources: no config of a kernel fits, or a
deterministic pick does not), one of our own kernels (model.*) with a variant over the shared memory
limit, a usable variant that spills registers, a kernel variant compiled after warmup (a compile, maybe an
autotune, while a request waits), a layer's state view that is not 16-byte aligned, an autotune config that
loads for some calls of a kernel and not for others of the same key (pick_dependent; complete with
--every-config).

`python -m bench.compile_report [--arch sm_86] [--out file.json] [--every-config] [--triton 3.6.0]`:
CPU-heavy when cold (every variant through ptxas), seconds per architecture when TRITON_CACHE_DIR holds them
(see the README).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import meta_serving as ms
from bench import triton_compile as tc

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = "/var/tmp/granite-h-triton"  # make test's TRITON_CACHE_DIR (kept between CI runs)

# (pass, SSM state dtype, autotune configs): each a fresh server with its own Triton kernel cache
SERVERS = (("serving", "bfloat16", contextlib.nullcontext), ("serving", "float32", contextlib.nullcontext),
           ("deterministic", "bfloat16", ms.deterministic_picks))


def _config(kernel) -> dict:
    """A compiled variant's block sizes (its BLOCK_* constexprs: what an autotune config sets)."""
    names = kernel.src.fn.arg_names
    return {names[p[0]]: v for p, v in kernel.src.constants.items() if names[p[0]].startswith("BLOCK")}


def summary(variants: dict, a: tc.Arch) -> dict:
    """Per kernel: variants, usable ones, the most shared memory / registers / spills of the usable ones,
    and every variant over the limits (shared memory, or registers leaving too few threads)."""
    out = {}
    for name, kernels in sorted(variants.items()):
        facts = [(tc.variant_facts(k, a), k) for k in kernels.values()]
        usable = [f for f, _ in facts if f["usable"]]
        out[name] = {
            "variants": len(facts), "usable": len(usable),
            "smem_max": max((f["smem"] for f in usable), default=None),
            "regs_max": max((f["regs"] for f in usable), default=None),
            "spills_max": max((f["spills"] for f in usable), default=None),
            "over_limit": [{**{k: f[k] for k in ("smem", "regs", "warps", "stages")}, **_config(k)}
                           for f, k in facts if not f["usable"]],
        }
    return out


def pick_dependent(variants: dict, a: tc.Arch) -> dict:
    """Autotune configs that load for some calls of a kernel and not for others with the same argument types
    (one autotune key, so one pick for all): a pick made on one call could fail to launch on another.
    Complete with every_config (every call compiles every config), else only where the variants overlap."""
    tuned = {f"{t.base_fn.__module__}:{t.base_fn.__name__}" for t in tc.autotuners()}
    out = {}
    for name, kernels in variants.items():
        groups: dict = {}
        for k in kernels.values() if name in tuned else ():
            cfg = (tuple(sorted(_config(k).items())), k.metadata.num_warps, k.metadata.num_stages)
            sig = tuple(sorted((n, str(t)) for n, t in k.src.signature.items()))
            groups.setdefault(sig, {}).setdefault(cfg, set()).add(tc.variant_facts(k, a)["usable"])
        bad = [dict(c[0], warps=c[1], stages=c[2]) for g in groups.values() for c, ok in g.items() if len(ok) > 1]
        if bad:
            out[name] = bad
    return out


def compile_arch(model, a: tc.Arch, every_config: bool = False) -> dict:
    rep: dict = {"gpu": a.gpu, "instance": a.instance, "smem_limit": a.smem, "servers": {}, "kernels": {}}
    variants: dict[str, dict[str, dict]] = {}
    for i, (pass_name, ssm, picks) in enumerate(SERVERS):
        device = a.cc * 100 + i  # each server its own kernel cache, as its own process would have
        with picks():
            rep["servers"][f"{pass_name} {ssm}"] = ms.serve_once(model, a, device, ssm, every_config=every_config)
        for name, kernels in tc.compiled(device).items():
            variants.setdefault(pass_name, {}).setdefault(name, {}).update(kernels)
    for pass_name, v in variants.items():
        rep["kernels"][pass_name] = summary(v, a)
    rep["pick_dependent"] = pick_dependent(variants["serving"], a)
    return rep


def report(archs=tc.ARCHS, every_config: bool = False) -> dict:
    import triton

    t0 = time.perf_counter()
    model = ms.meta_model()
    out = {"triton": triton.__version__, "model": f"granite-4.0-h micro (bench/micro_config.json) bf16, full width, "
           f"first {ms.LAYERS} layers (bench/meta_serving.py)", "layer_views_aligned": ms.layer_views_aligned(),
           "every_config": every_config,
           "archs": {}}
    for a in archs:
        t = time.perf_counter()
        out["archs"][f"sm_{a.cc}"] = compile_arch(model, a, every_config)
        out["archs"][f"sm_{a.cc}"]["seconds"] = round(time.perf_counter() - t, 1)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def problems(rep: dict) -> list[str]:
    """What tests/compile fails on (see the module docstring)."""
    bad = [] if rep["layer_views_aligned"] else ["a layer's state-pool view is not 16-byte aligned"]
    for arch_name, r in rep["archs"].items():
        for server, run in r["servers"].items():
            bad += [f"{arch_name} {server}: {e}" for e in run["errors"]]
            bad += [f"{arch_name} {server}: {n} variant(s) of {k} compiled after warmup"
                    for k, n in run["new_after_warmup"].items()]
        bad += [f"{arch_name}: {name}'s autotune configs {c} load for some calls and not others with the same "
                "argument types (an autotuned pick could fail to launch)" for name, c in r["pick_dependent"].items()]
        for pass_name, kernels in r["kernels"].items():
            for name, k in kernels.items():
                if name.startswith("model.") and k["over_limit"]:
                    bad.append(f"{arch_name} {pass_name}: our {name} has variants over the limits: {k['over_limit']}")
                if k["spills_max"]:
                    bad.append(f"{arch_name} {pass_name}: {name} spills {k['spills_max']} registers")
    return bad


def table(rep: dict) -> str:
    """Per kernel and architecture (serving pass): the most shared memory (KB) and registers of its usable
    variants, usable / compiled variants, and how many are over the limits."""
    archs = list(rep["archs"])
    names = sorted({n for r in rep["archs"].values() for n in r["kernels"].get("serving", {})})
    lines = [f"{'kernel':<52}" + "".join(f"{x:>24}" for x in archs)]
    for n in names:
        cells = []
        for x in archs:
            k = rep["archs"][x]["kernels"]["serving"].get(n)
            cells.append("-" if k is None else f"{(k['smem_max'] or 0) / 1024:.0f}K r{k['regs_max']} "
                         f"{k['usable']}/{k['variants']}" + (f" {len(k['over_limit'])} over" if k["over_limit"] else ""))
        lines.append(f"{n.split('.')[-1][:52]:<52}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def triton_at(version: str) -> Path:
    """Another triton, installed once with pip --target under /var/tmp (kept, as the Triton cache is)."""
    d = Path("/var/tmp") / f"granite-h-triton-{version}"
    if not (d / "triton" / "__init__.py").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(d),
                        f"triton=={version}"], check=True)
    return d


def bench_section() -> dict:
    """`make bench`'s "compile" section: the report with the venv's triton and, opt-in (COMPILE_TRITON36=1),
    with the CUDA image's 3.6.0, by version. Each in a subprocess (the driver swap stays out of the bench's
    process); TRITON_CACHE_DIR defaults to make test's."""
    env = dict(os.environ)
    env.setdefault("TRITON_CACHE_DIR", CACHE_DIR)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for version in [None] + (["3.6.0"] if os.environ.get("COMPILE_TRITON36") == "1" else []):
            path = Path(tmp) / f"{version}.json"
            run = subprocess.run([sys.executable, "-m", "bench.compile_report", "--out", str(path),
                                  *(["--triton", version] if version else [])], env=env, cwd=ROOT,
                                 capture_output=True, text=True)  # exit 1 = problems, listed in the report
            rep = json.loads(path.read_text()) if path.exists() else {"triton": version, "error": run.stderr[-2000:]}
            out[f"triton {rep['triton']}"] = rep
    return out


def main(argv=None) -> int:
    import triton

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", help="sm_80 | sm_86 | sm_89 | sm_90 (default: all four)")
    ap.add_argument("--out", type=Path, help="write the report (JSON) here, else to stdout")
    ap.add_argument("--every-config", action="store_true", help="autotune on every call: every config compiles "
                    "for every specialization (pick_dependent complete; several times the compiles)")
    ap.add_argument("--triton", help="compile with this triton version instead (e.g. 3.6.0, the CUDA image's): "
                    "installed under /var/tmp, run in a subprocess")
    a = ap.parse_args(argv)
    if a.triton and a.triton != triton.__version__:
        path = [str(triton_at(a.triton)), str(ROOT), os.environ.get("PYTHONPATH", "")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
        return subprocess.run([sys.executable, "-m", "bench.compile_report", *(argv or sys.argv[1:])], env=env).returncode
    rep = report([tc.arch(x) for x in a.arch] if a.arch else tc.ARCHS, a.every_config)
    rep["problems"] = problems(rep)
    text = json.dumps(rep, indent=1)
    if a.out:
        a.out.write_text(text + "\n")
    else:
        print(text)
    print(table(rep), file=sys.stderr)
    for line in rep["problems"]:
        print("PROBLEM:", line, file=sys.stderr)
    return 1 if rep["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
