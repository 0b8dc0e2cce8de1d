"""Measure on this CPU machine what bench/gpu_plan.py needs to estimate `make gpu-check` on an H100; writes
bench/results/gpu-check-estimate.json. A few minutes on 2 cores: run it by hand when the check's steps change
(tests/bench/test_gpu_check.py fails when the file no longer matches them).

    .venv/bin/python -m bench.gpu_check_measure [--wheels build/wheels] [--out FILE]

Times are CPU seconds (the process and its children: what one idle core takes, however loaded this shared
machine is), with wall seconds beside them:
- imports: the median of 3 fresh python processes for each step's imports (process start included);
- install: unpacking every carried wheel (an upper bound: the check skips those the machine has);
- conv: nvcc 13 for sm_90 on each source the build compiles (bench/conv_build.py's own commands, one after
  the other), the link, and the binding object's undefined causal-conv1d kernels (no backward one);
  a CPU-only torch lacks one generated header (c10/cuda/impl/cuda_cmake_macros.h): a one-line stand-in is put
  on the include path for the timing, nothing else differs;
- triton: every variant tests/gpu, the bounded benchmark and its HF baseline compile, each compiled for
  GPUTarget("cuda", 90, 32) (bench/compile_only.py) through the same call sites, dtypes and shapes (the
  micro's widths; 2 layers, a small vocabulary and MLP: no Triton kernel's variant depends on those), with
  MAMBA_DETERMINISTIC=1 and an empty Triton cache, in a child process;
- launches: kernel launches of one decode step, the engine's (bench/launches.py) and HF generate's.

Size: ~300 lines: one measurement per step of the GPU check's plan, each with the call sites it replays.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import conv_build, gpu_plan  # noqa: E402

PROBE = "from model.network.fused_ops import load_fused; load_fused()"
CMAKE_MACROS = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"  # what a CUDA torch build generates


def _timed(argv: list[str], env: dict | None = None, n: int = 3) -> dict:
    """Median wall and CPU seconds (the process and its children) of n runs: CPU seconds are what an idle core
    takes, whatever else loads this machine."""
    runs = [_run(argv, env) for _ in range(n)]
    return {k: round(statistics.median(r[k] for r in runs), 2) for k in ("wall_s", "cpu_s")}


def _run(cmd: list[str], env: dict | None = None) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": round(time.perf_counter() - t, 2),
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2)}


def imports(site: Path) -> dict:
    py = [sys.executable, "-c"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))
    return {"torch_triton_transformers": _timed([*py, "import torch, triton, transformers"]),
            "probe": _timed([*py, PROBE], env),
            "pytest_collect_tests_gpu": _timed([sys.executable, "-m", "pytest", "-q", "--collect-only",
                                                "-p", "no:cacheprovider", "-m", "gpu", "tests/gpu"], env),
            "bench_imports": _timed([*py, "import bench.gpu_bench; from model.network.fused_ops import load_fused; "
                                     "load_fused(); from transformers import GraniteMoeHybridForCausalLM"], env)}


def install(wheels: Path, site: Path) -> dict:
    """The machine's distributions listed (a python child), then every carried wheel unpacked (upper bound)."""
    from bench.compile_only import cpu_seconds
    from bench.gpu_check import install_wheels, installed_dists

    t, cpu = time.perf_counter(), cpu_seconds()
    installed_dists(dict(os.environ, PYTHONPATH=str(ROOT)))
    install_wheels(wheels, site, have=lambda dist: None)
    return {"wall_s": round(time.perf_counter() - t, 2), "cpu_s": round(cpu_seconds() - cpu, 2)}


def conv(sdist: Path, work: Path) -> dict:
    cuda_home, cxx = conv_build.find_cuda_home(), shutil.which("c++") or shutil.which("g++")
    cpu = time.process_time()
    src = conv_build.unpack(sdist, work)
    unpack_s = time.process_time() - cpu
    shim = work / "shim"
    (shim / "c10" / "cuda" / "impl").mkdir(parents=True)
    (shim / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(CMAKE_MACROS)
    p = conv_build.plan(src, work, "90", cuda_home, cxx)
    units = [{"src": Path(c[2]).name, **_run([*c, f"-I{shim}"])} for c in p["compile"]]
    link = [a for a in p["link"] if not (a.startswith("-l") and "cuda" in a)]  # CPU torch: no libc10_cuda, ...
    link_s = _run(link)["cpu_s"]
    binding = next(c[4] for c in p["compile"] if c[2].endswith(conv_build.BINDING))
    undefined = subprocess.run(["nm", "-C", "-u", binding], check=True, capture_output=True, text=True).stdout
    return {"arch": "sm_90", "nvcc": subprocess.run([p["compile"][0][0], "--version"], capture_output=True,
                                                    text=True).stdout.strip().splitlines()[-1],
            "units": units, "unpack_s": round(unpack_s, 2), "link_s": link_s,
            "binding_undefined_kernels": sorted({ln.split("U ")[-1].split("(")[0] for ln in undefined.splitlines()
                                                 if "causal_conv1d" in ln and "_cuda<" in ln})}


def launches() -> dict:
    import torch
    from transformers import GraniteMoeHybridForCausalLM

    from bench import launches as lc
    from tests.tiny_granite import tiny_config

    engine = lc.count_decode(lc.micro_arch(1)[0], fused=True)["launches"]
    # HF generate (its torch path: the most launches) on the micro's 40-layer pattern at small widths
    kinds = ["linear_attention" if k == "mamba" else "full_attention" for k in lc.micro_arch(1)[1].kinds]
    hf = GraniteMoeHybridForCausalLM(tiny_config(layer_types=kinds)).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    counts = []
    for n in (1, 3):
        counter = lc.LaunchCounter()
        with counter, torch.no_grad():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        counts.append(sum(counter.ops.values()))
    return {"engine_decode_step": engine, "hf_decode_step": (counts[1] - counts[0]) // 2}


def triton_variants(bench: dict) -> dict:
    """In a child (MAMBA_DETERMINISTIC and the Triton cache must be set before anything imports triton)."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, MAMBA_DETERMINISTIC="1", TRITON_CACHE_DIR=cache)
        p = subprocess.run([sys.executable, "-m", "bench.gpu_check_measure", "--triton-child", json.dumps(bench)],
                           cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(p.stdout[-2000:] + p.stderr[-4000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---- the Triton child: the call sites of tests/gpu, the bench and HF, compile-only -------------------------


def _cases(test):
    """The keyword sets of a test's @pytest.mark.parametrize marks (their product)."""
    grids = []
    for mark in getattr(test, "pytestmark", []):
        if mark.name == "parametrize":
            names = [n.strip() for n in mark.args[0].split(",")]
            grids.append([dict(zip(names, v if len(names) > 1 else (v,), strict=True)) for v in mark.args[1]])
    for combo in itertools.product(*grids):
        yield {k: v for d in combo for k, v in d.items()}


def _runner(where, cfg, kernels, mode=None, model=None):
    from model.runtime.runner import ModelRunner

    r = ModelRunner(where, cfg, decode_mode=mode, model=model)
    r.kernels = kernels  # the fused path on CPU tensors (static decode stands in for CUDA graphs: same shapes)
    r.warmup()
    return r


def _micro(tmp: Path):
    """The micro's widths in bf16 with 2 layers (mamba, attention), a small vocabulary and MLP."""
    import torch

    from bench.gpu_bench import build_full_size

    cfg = json.loads(gpu_plan.ROOT.joinpath("bench", "micro_config.json").read_text())
    cfg.update(num_hidden_layers=2, layer_types=["mamba", "attention"], vocab_size=1024,
               shared_intermediate_size=512, intermediate_size=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    path = tmp / "micro2.json"
    path.write_text(json.dumps(cfg))
    return build_full_size("cpu", torch.bfloat16, config=path), path


def _tests_gpu(kernels, micro, tmp: Path) -> None:
    import torch

    import tests.gpu.test_fused as tf
    from model.network.kernels import Kernels
    from model.types import EngineConfig
    from tests.tiny_granite import build_tiny

    tf.DEV, tf._close = "cpu", lambda *a, **k: None  # outputs are garbage: only the calls matter
    os.environ["TRITON_F32_DEFAULT"] = "ieee"  # as tests/gpu/conftest.py sets it on a CUDA machine
    ref = Kernels("reference", "cpu")
    for test in (tf.test_ssd_prefill, tf.test_ssm_decode):  # test_conv: CUDA C++, no Triton
        for kw in _cases(test):
            test(kernels, ref, **kw)
    hf = build_tiny(tmp / "tiny", seed=4)
    tiny = dict(max_input_tokens=48, max_total_tokens=64, dtype="float32", device="cpu")
    r = _runner(tmp / "tiny", EngineConfig(max_concurrent_seqs=4, kv_cache_tokens=512, **tiny), kernels, "static")
    tf._greedy(r, [list(range(3, 12)), list(range(40, 71)), [5, 6, 7, 8, 9, 10]], 12)
    with torch.no_grad():
        hf.generate(torch.tensor([list(range(10, 40))]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                    pad_token_id=0)
    r = _runner(tmp / "tiny", EngineConfig(max_concurrent_seqs=2, kv_cache_tokens=256, **tiny), kernels)
    tf._greedy(r, [list(range(10, 40))], 10)
    cfg = EngineConfig(max_concurrent_seqs=4, max_input_tokens=200, max_total_tokens=256, kv_cache_tokens=1024,
                       dtype="bfloat16", ssm_state_dtype="bfloat16", device="cpu")
    for mode in ("eager", "static"):
        tf._greedy(_runner(None, cfg, kernels, mode, micro), [list(range(100, 300)), list(range(7, 40))], 6)
    del os.environ["TRITON_F32_DEFAULT"]


def _bench(kernels, micro, bench: dict) -> None:
    from bench.gpu_bench import decode_rate
    from model.types import EngineConfig

    prompt, steps, mb = bench["prompt"], bench["steps"], bench["max_batch"]
    total = prompt + steps + 64
    cfg = EngineConfig(max_concurrent_seqs=mb, max_input_tokens=prompt + 1, max_total_tokens=total,
                       max_step_tokens=mb * prompt, kv_cache_tokens=mb * total, device="cpu", dtype="bfloat16",
                       ssm_state_dtype="bfloat16")
    for mode in ("static", "eager"):
        r = _runner(None, cfg, kernels, mode, micro)
        decode_rate(r, 1, prompt, steps)
        b = 1
        while mode == "static" and b <= mb:
            decode_rate(r, b, prompt, max(8, steps // 2))
            b *= 2


def triton_child(bench: dict) -> dict:
    import inspect
    import warnings

    import torch

    from bench.compile_only import compile_only
    from bench.gpu_bench import hf_generate_rate
    from model.network.fused_ops import load_fused
    from model.network.kernels import Kernels

    warnings.filterwarnings("ignore", message="Deterministic mode")
    ops = load_fused(cuda=False)  # before transformers' model module: it binds mamba-ssm's kernels, as on the GPU
    if missing := [n for n in ops.TRITON if getattr(ops, n) is None]:
        raise RuntimeError(f"Triton kernels not importable: {missing}: {ops.errors}")
    ops.causal_conv1d_fn = lambda x, weight, bias=None, activation=None, **kw: torch.empty_like(x)  # CUDA C++
    ops.causal_conv1d_update = lambda x, conv_state, weight, bias=None, activation=None, **kw: torch.empty_like(x)
    kernels = Kernels("fused", "cpu", fused=ops)
    out: dict = {"target": "cuda sm_90, warp 32", "bench_args": bench}
    with tempfile.TemporaryDirectory() as tmp, compile_only(90) as compiles:
        micro, micro_cfg = _micro(Path(tmp))
        work = {"tests_gpu": lambda: _tests_gpu(kernels, micro, Path(tmp)),
                "bench": lambda: _bench(kernels, micro, bench),
                "hf": lambda: hf_generate_rate(micro, bench["prompt"], bench["hf_steps"], micro_cfg)}
        for name, fn in work.items():
            n0, t = len(compiles), time.perf_counter()
            fn()
            new = compiles[n0:]
            out[name] = {"variants": len(new), "seconds": round(sum(cpu for _, cpu, _ in new), 1),
                         "compile_wall_s": round(sum(w for _, _, w in new), 1),
                         "workload_wall_s": round(time.perf_counter() - t, 1),
                         "by_kernel": dict(Counter(k for k, _, _ in new).most_common())}
            print(name, {k: v for k, v in out[name].items() if k != "by_kernel"}, file=sys.stderr, flush=True)
    import transformers.models.granitemoehybrid.modeling_granitemoehybrid as hf_mod

    out["hf_uses_mamba_kernels"] = inspect.getclosurevars(hf_mod.mamba2_chunk_scan).nonlocals["is_new_implementation"]
    return out


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheels", type=Path, default=ROOT / "build" / "wheels")
    ap.add_argument("--out", type=Path, default=gpu_plan.MEASURED)
    ap.add_argument("--triton-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.triton_child:
        print(json.dumps(triton_child(json.loads(args.triton_child))))
        return 0
    import torch
    import triton

    (sdist,) = sorted(args.wheels.glob("causal_conv1d-*.tar.gz"))[-1:]
    res: dict = {"machine": f"{os.cpu_count()}-core VM, {_cpu_model()}",
                 "date": date.today().isoformat(), "python": platform.python_version(), "torch": torch.__version__,
                 "triton": triton.__version__, "load_1min_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        res["install_s"] = install(args.wheels, site)
        res["imports_s"] = imports(site)
        res["conv"] = conv(sdist, Path(tmp))
    res["launches"] = launches()
    res["triton"] = {"bench_args": gpu_plan.BENCH, "workloads": (t := triton_variants(gpu_plan.BENCH))}
    res["triton"]["target"] = t.pop("target")
    res["triton"]["hf_uses_mamba_kernels"] = t.pop("hf_uses_mamba_kernels")
    t.pop("bench_args")
    res["load_1min_after"] = os.getloadavg()[0]
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(gpu_plan.render(gpu_plan.plan(res), res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
