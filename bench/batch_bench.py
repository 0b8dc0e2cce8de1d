"""Batch transform throughput: the same records through the batch pipeline one at a time
(concurrency 1, the baseline) and with many in flight (the engine batches them), in one run on one
engine, reported as a ratio.

    python bench/batch_bench.py [--records 256] [--max-new-tokens 16] [--model-dir DIR | --model-id demo]
                                [--concurrency N] [--out bench/results/batch_bench.json]

Engine settings come from the environment like the server's (serve/config.py); the default model
is the built-in demo checkpoint. Greedy decoding, so both passes generate the same tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve.batch.cli import default_concurrency, start_engine  # noqa: E402
from serve.batch.runner import BatchJob, BatchRun  # noqa: E402
from serve.config import load_config  # noqa: E402

WORDS = "the hybrid model reads a long document about state space layers and attention".split()


def make_records(n: int) -> bytes:
    lines = []
    for i in range(n):
        text = f"Record {i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(4 + 3 * (i % 9)))
        lines.append(json.dumps({"inputs": text}))
    return ("\n".join(lines) + "\n").encode()


def timed_pass(infer, data: bytes, tmp: str, name: str, concurrency: int, params: dict) -> dict:
    inp = os.path.join(tmp, name, "in.jsonl")
    os.makedirs(os.path.dirname(inp))
    with open(inp, "wb") as f:
        f.write(data)
    out = os.path.join(tmp, name, "out")
    job = BatchJob(input=inp, output=out, work_dir=os.path.join(out, ".batch"), defaults=params,
                   concurrency=concurrency, progress="none")
    t0 = time.perf_counter()
    s = BatchRun(job, infer).run()
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "in.jsonl.out"), "rb") as f:
        text = f.read()
    return {"concurrency": concurrency, "records": s["records"], "errors": s["errors"],
            "generated_tokens": s["generated_tokens_this_run"], "wall_s": round(wall, 3),
            "records_per_s": round(s["records"] / wall, 3),
            "tokens_per_s": round(s["generated_tokens_this_run"] / wall, 3), "_out": text}


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (CUDA)"
    except ImportError:
        pass
    return f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()}"


def run_bench(records: int = 256, max_new_tokens: int = 16, model_dir: str | None = None,
              model_id: str | None = None, concurrency: int = 0, out: str | None = None) -> dict:
    cfg = load_config()
    engine, name, cfg = start_engine(cfg, model_dir, model_id or (None if model_dir else "demo"))
    from serve.handler import handle_record

    def infer(rec, defaults):
        return handle_record(engine, rec, defaults)

    params = {"max_new_tokens": max_new_tokens}
    data = make_records(records)
    conc = concurrency or default_concurrency(cfg.engine)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            timed_pass(infer, make_records(4), tmp, "warm", 4, params)
            serial = timed_pass(infer, data, tmp, "serial", 1, params)
            batch = timed_pass(infer, data, tmp, "batch", conc, params)
    finally:
        engine.shutdown(timeout=5.0)
    same = serial.pop("_out") == batch.pop("_out")
    report = {"bench": "batch_transform", "machine": machine(), "model": name, "records": records,
              "max_new_tokens": max_new_tokens, "engine": {"max_concurrent_seqs": cfg.engine.max_concurrent_seqs,
                                                           "device": cfg.engine.device},
              "serial": serial, "batch": batch, "outputs_identical": same,
              "throughput_ratio": round(batch["tokens_per_s"] / max(serial["tokens_per_s"], 1e-9), 2),
              "wall_ratio": round(serial["wall_s"] / max(batch["wall_s"], 1e-9), 2)}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--model-dir")
    p.add_argument("--model-id")
    p.add_argument("--concurrency", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "batch_bench.json"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    r = run_bench(a.records, a.max_new_tokens, a.model_dir, a.model_id, a.concurrency, a.out)
    print(f"batch transform, {r['records']} records x {r['max_new_tokens']} new tokens on {r['machine']} "
          f"({r['model']}):\n  one at a time  {r['serial']['tokens_per_s']:10.1f} tok/s  {r['serial']['wall_s']:8.2f} s\n"
          f"  batched (c={r['batch']['concurrency']:>3}) {r['batch']['tokens_per_s']:10.1f} tok/s  "
          f"{r['batch']['wall_s']:8.2f} s\n  ratio {r['throughput_ratio']}x, outputs identical: "
          f"{r['outputs_identical']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
