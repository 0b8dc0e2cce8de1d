"""The steps of `make gpu-check` (bench/gpu_check.py) with a time estimate for each on one H100, built from
measurements taken on a CPU machine (bench/results/gpu-check-estimate.json, written by
`python -m bench.gpu_check_measure`) and a few stated assumptions for what only a GPU can run.

    python -m bench.gpu_plan        the table (also printed by `bash bench/gpu_check.sh --dry-run OUT`)

Measured (CPU seconds of the process and its children, on the machine named in the JSON: what one idle core
takes, however loaded that shared machine was): python + import times, unpacking the wheels, nvcc for
sm_90 on each causal-conv1d source that is built (the units compile in parallel: with at least as many cores
as units, the longest one decides; `CPU_FACTOR` scales one core of that machine to one core of the GPU host),
the link, pytest's collection of tests/gpu, and every Triton variant the check compiles, each compiled for
GPUTarget("cuda", 90, 32) by the real Triton compiler (bench/compile_only.py) through the same call sites and
shapes (MAMBA_DETERMINISTIC=1: one autotune config per kernel). Triton compiles one variant at a time in a
process, so those seconds are not divided by cores. Kernel launches per decode step are counted on CPU.
Assumed (GPU work and a CUDA torch's extra import time, small next to the compiles): `ASSUMED` below, each
with its reason.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEASURED = ROOT / "bench" / "results" / "gpu-check-estimate.json"
BUDGET_S = 300  # the whole check, by this estimate and by gpu_check.py's own budget (it stops there)
# The bounded benchmark the check runs (bench/gpu_bench.py): 5 sweep points, 5 x 5 decode graphs, a short
# HF baseline. `make bench-gpu` keeps the full defaults.
BENCH = {"prompt": 128, "steps": 32, "max_batch": 16, "hf_steps": 16}
BENCH_ARGS = [a for k, v in BENCH.items() for a in (f"--{k.replace('_', '-')}", str(v))]
CPU_FACTOR = 1.0  # seconds on one core of the GPU host per second on one core of the measuring VM
SOURCES_BUILT = ("causal_conv1d_fwd.cu", "causal_conv1d_update.cu", "causal_conv1d_infer.cpp")
ASSUMED = {  # seconds; what a CPU cannot measure
    "cuda_torch_s": 3.0,  # per process importing torch: a CUDA build's libraries (~2 GB, cold disk) beyond a CPU's
    "cuda_init_s": 3.0,  # CUDA context, cuBLAS handles, first allocation in a process that uses the GPU
    "launch_s": 25e-6,  # host time of one eager launch (Python, dispatcher, cudaLaunchKernel), H100 host
    "graph_step_s": 0.004,  # one replayed decode step: 6.4 GB of weights at ~half of 3.35 TB/s, any batch <= 16
    "capture_s": 0.05,  # one CUDA graph capture (the capture itself; its 3 eager runs are counted as steps)
    "build_full_s": 3.0,  # 3.19B random bf16 weights allocated and initialised on the GPU (bench.gpu_bench)
    "kernel_test_s": 0.1,  # one kernel-level case of tests/gpu (fused + reference on small tensors)
}
# GPU work of tests/gpu/test_fused.py (read from it; the Triton compiles are measured, not listed here):
# kernel cases (8 SSD + 9 decode cases x 2 dt limits, 6 conv: 40 fused + reference pairs, rounded up); tiny
# runners (4 layers: ~1/10 of an eager micro step each); the full-size test: one build, an eager and a graph
# runner (3 batch x 5 width keys, 3 eager runs per capture), 2 x 6 decode steps.
TESTS_GPU_WORK = {"kernel_cases": 50, "builds": 1, "captures": 15, "eager_steps": 15 * 3 + 3 + 12 + 2 * 4,
                  "tiny_eager_steps": 9 * 3 + 2 * 12 + 10, "graph_steps": 6}


def load(path: Path = MEASURED) -> dict:
    return json.loads(path.read_text())


def bench_work(bench: dict = BENCH) -> dict:
    """Decode steps, graph captures and HF tokens of one gpu_bench run with these arguments (its own code)."""
    from model.runtime.decode_static import decode_buckets, width_buckets
    from model.runtime.state import BLOCK_SIZE

    max_total = bench["prompt"] + bench["steps"] + 64  # gpu_bench's EngineConfig
    buckets = decode_buckets(bench["max_batch"])
    keys = len(buckets) * len(width_buckets(math.ceil(max_total / BLOCK_SIZE)))
    sweep = bench["max_batch"].bit_length()  # batch 1, 2, 4, ... <= max_batch
    return {"captures": keys,
            "graph_steps": bench["steps"] + sweep * max(8, bench["steps"] // 2),  # batch 1, then the sweep
            # warmup: one decode per runner; 3 eager runs per capture; the eager runner's buckets and steps
            "eager_steps": 2 + 3 * keys + len(buckets) + bench["steps"],
            "prefills": 2 * 2 + 1 + sweep + 1,  # 2 per warmup, one per decode_rate
            "hf_tokens": 4 + 1 + bench["hf_steps"], "builds": 1}


def plan(m: dict, bench: dict = BENCH) -> list[dict]:
    """[{step, estimate_s, measured, assumed}] in the order gpu_check.py runs them."""
    a, f = ASSUMED, CPU_FACTOR
    imp, conv, tri, launches = m["imports_s"], m["conv"], m["triton"]["workloads"], m["launches"]
    eager_step = launches["engine_decode_step"] * a["launch_s"]
    units = {u["src"]: u["cpu_s"] for u in conv["units"]}
    imp = {k: v["cpu_s"] for k, v in imp.items()}
    w = bench_work(bench)
    rows = [
        ("environment", f * imp["torch_triton_transformers"], a["cuda_torch_s"] + a["cuda_init_s"],
         "python + import torch, triton, transformers; CUDA init"),
        ("install", f * m["install_s"]["cpu_s"], 0.0, "unzip mamba-ssm (+ einops, pytest, ... only where missing)"),
        ("conv_build", f * (conv["unpack_s"] + max(units.values()) + conv["link_s"]), 0.0,
         f"nvcc sm_90, {len(units)} units in parallel: longest {max(units, key=units.get)} "
         f"{max(units.values()):.1f}s; link"),
        ("probe", f * imp["probe"], a["cuda_torch_s"], "python + import the kernels from the carried site"),
        ("tests_gpu", f * (imp["pytest_collect_tests_gpu"] + tri["tests_gpu"]["seconds"]),
         a["cuda_torch_s"] + a["cuda_init_s"] + TESTS_GPU_WORK["kernel_cases"] * a["kernel_test_s"]
         + TESTS_GPU_WORK["builds"] * a["build_full_s"] + TESTS_GPU_WORK["captures"] * a["capture_s"]
         + (TESTS_GPU_WORK["eager_steps"] + TESTS_GPU_WORK["tiny_eager_steps"] / 10) * eager_step
         + TESTS_GPU_WORK["graph_steps"] * a["graph_step_s"],
         f"pytest start + collection; {tri['tests_gpu']['variants']} Triton variants compiled; GPU work"),
        ("bench", f * (imp["bench_imports"] + tri["bench"]["seconds"] + tri["hf"]["seconds"]),
         a["cuda_torch_s"] + a["cuda_init_s"] + w["builds"] * a["build_full_s"] + w["captures"] * a["capture_s"]
         + (w["eager_steps"] + 2 * w["prefills"]) * eager_step + w["graph_steps"] * a["graph_step_s"]
         + w["hf_tokens"] * launches["hf_decode_step"] * a["launch_s"],
         f"imports; {tri['bench']['variants']} + {tri['hf']['variants']} (HF) Triton variants compiled; "
         f"{w['captures']} graph captures, {w['graph_steps']} replayed + {w['eager_steps']} eager steps, "
         f"{w['hf_tokens']} HF tokens"),
    ]
    return [{"step": s, "measured_s": round(ms, 1), "assumed_s": round(asm, 1), "estimate_s": round(ms + asm, 1),
             "what": what} for s, ms, asm, what in rows]


def stale(m: dict, bench: dict = BENCH) -> list[str]:
    """Why the measurements no longer describe this check (empty: they do)."""
    why = []
    if m["triton"]["bench_args"] != bench:
        why.append(f"Triton variants measured for bench {m['triton']['bench_args']}, the check runs {bench}")
    if sorted(u["src"] for u in m["conv"]["units"]) != sorted(SOURCES_BUILT):
        why.append(f"nvcc measured {[u['src'] for u in m['conv']['units']]}, the build compiles {SOURCES_BUILT}")
    return why


def render(rows: list[dict], m: dict) -> str:
    total = sum(r["estimate_s"] for r in rows)
    lines = [f"gpu-check step plan, estimated for one H100: CPU seconds measured on {m['machine']} "
             f"(x{CPU_FACTOR} per core), GPU work and CUDA torch assumed (bench/gpu_plan.py)",
             f"{'step':<12} {'measured':>9} {'assumed':>8} {'estimate':>9}  what"]
    lines += [f"{r['step']:<12} {r['measured_s']:>8.1f}s {r['assumed_s']:>7.1f}s {r['estimate_s']:>8.1f}s  {r['what']}"
              for r in rows]
    lines.append(f"{'total':<12} {sum(r['measured_s'] for r in rows):>8.1f}s {sum(r['assumed_s'] for r in rows):>7.1f}s "
                 f"{total:>8.1f}s  budget {BUDGET_S}s (gpu_check.py stops itself there)")
    lines += [f"STALE: {w}" for w in stale(m)]
    return "\n".join(lines)


def main() -> int:
    m = load()
    print(render(plan(m), m))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
