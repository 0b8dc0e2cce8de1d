"""n = 8 forked rows against 8 separate requests of the same prompt, alternated in the same run (engine in-process).

    python bench/forks.py [--rounds 3] [--prompt-tokens 1000] [--gen-tokens 64] [--n 8]

Forked: one request, engine.submit_n(request, n): one prefill, n rows from copies of its state. Separate: n
requests of the same prompt submitted together (each prefills it). Both sample with seed + i per row, so the
outputs must be identical between the modes (checked). Prefix reuse is off in both, so neither mode reuses the
other's snapshots. Reported per mode (sums over the rounds): prefill tokens the engine computed, generated tokens,
wall time, aggregate generated tokens/s, mean time to first token; and the ratios forked / separate.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.http_load import machine_name  # noqa: E402
from model.engine.engine import Engine  # noqa: E402
from model.types import EngineConfig, GenerationRequest, SamplingParams  # noqa: E402


def _drain(handles, t0: float) -> tuple[list[list[int]], list[float]]:
    outs, ttfts = [], []
    for h in handles:  # rows run in the same steps: reading them in turn waits for nobody
        toks, first = [], None
        for ev in h:
            if ev.error:
                raise RuntimeError(ev.error)
            if ev.token_id >= 0:
                first = first or time.perf_counter()
                toks.append(ev.token_id)
        outs.append(toks)
        ttfts.append(first - t0)
    return outs, ttfts


def _round(engine: Engine, prompt: list[int], n: int, gen: int, forked: bool, seed: int) -> dict:
    params = SamplingParams(max_new_tokens=gen, do_sample=True, temperature=0.8, seed=seed, ignore_eos=True)
    before = engine.stats()["prefill_tokens_total"]
    t0 = time.perf_counter()
    if forked:
        handles = engine.submit_n(GenerationRequest(tuple(prompt), params), n)
    else:
        handles = [engine.submit(GenerationRequest(tuple(prompt), SamplingParams(
            **{**params.__dict__, "seed": seed + i}))) for i in range(n)]
    outs, ttfts = _drain(handles, t0)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "prefill_tokens": engine.stats()["prefill_tokens_total"] - before,
            "generated": sum(len(o) for o in outs), "ttft_mean_s": sum(ttfts) / n, "_outs": outs}


def run_forks(ckpt: Path, rounds: int = 3, prompt_tokens: int = 1000, gen: int = 64, n: int = 8, **cfg) -> dict:
    base = dict(device="cpu", dtype="float32", max_concurrent_seqs=n, max_input_tokens=8191, max_total_tokens=8192,
                prefix_cache=False)
    base.update(cfg)
    engine = Engine(ckpt, EngineConfig(**base), "bench")
    engine.start()
    if not engine.wait_ready(300):
        raise RuntimeError(engine.error)
    vocab = engine.runner.vocab_size
    try:
        _round(engine, [5] * 32, 2, 4, True, 0)  # warm-up, both paths
        _round(engine, [5] * 32, 2, 4, False, 0)
        sums = {m: {"wall_s": 0.0, "prefill_tokens": 0, "generated": 0, "ttft_mean_s": 0.0} for m in ("forked", "separate")}
        identical = True
        for r in range(rounds):
            rng = random.Random(r)
            prompt = [rng.randrange(3, vocab) for _ in range(prompt_tokens)]
            res = {}
            for mode in (("forked", "separate") if r % 2 == 0 else ("separate", "forked")):  # alternated
                res[mode] = _round(engine, prompt, n, gen, mode == "forked", seed=100 + r)
            identical &= res["forked"].pop("_outs") == res["separate"].pop("_outs")
            for mode, v in res.items():
                for k in sums[mode]:
                    sums[mode][k] += v[k]
        stats = engine.stats()
    finally:
        engine.shutdown(5)
    for s in sums.values():
        s["tokens_per_s"] = round(s["generated"] / s["wall_s"], 1)
        s["ttft_mean_s"] = round(s["ttft_mean_s"] / rounds, 4)
        s["wall_s"] = round(s["wall_s"], 2)
    f, s = sums["forked"], sums["separate"]
    return {"n": n, "rounds": rounds, "prompt_tokens": prompt_tokens, "generated_per_row": gen,
            "forked": f, "separate": s, "outputs_identical": identical,
            "prefill_work_ratio_forked_over_separate": round(f["prefill_tokens"] / max(s["prefill_tokens"], 1), 4),
            "tokens_per_s_ratio_forked_over_separate": round(f["tokens_per_s"] / max(s["tokens_per_s"], 1e-9), 2),
            "ttft_ratio_forked_over_separate": round(f["ttft_mean_s"] / max(s["ttft_mean_s"], 1e-9), 3),
            "targets": {"prefill_work_ratio": 1 / n, "tokens_per_s_ratio": 1.5},
            "kv_blocks_free_after": stats["kv_blocks_free"] == stats["kv_blocks_total"],
            "load_average_1m_after": round(os.getloadavg()[0], 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--model-dir", help="a checkpoint (default: the demo preset, built in a temp dir)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "forks-cpu.json"))
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if a.model_dir:
            ckpt = Path(a.model_dir)
        else:
            from model.checkpoint.demo import build_checkpoint

            ckpt = build_checkpoint(Path(tmp) / "demo", preset="demo")
        report = run_forks(ckpt, a.rounds, a.prompt_tokens, a.gen_tokens, a.n)
    import torch

    report = {"machine": machine_name(), "torch": torch.__version__,
              "model": "demo preset (random weights), fp32, CPU", **report}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
