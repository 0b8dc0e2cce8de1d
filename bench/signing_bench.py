"""Cost of the load-time signature check: verify_checkpoint (model/checkpoint/signing.py, the server's code path)
on a synthetic checkpoint, blake3 (what `python -m serve sign` writes) against sha256 (the library's
default) in the same run, warm page cache, projected to the full-size checkpoint.

    python bench/signing_bench.py [--gib 2] [--files 4] [--repeats 3] [--out bench/results/signing.json]

The files hold random bytes (hashing speed does not depend on content). Reading 6.4 GB from a cold
disk adds its own time (the weight loader then reads the same bytes from the page cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint.signing import SignaturePolicy, verify_checkpoint  # noqa: E402
from serve.sign import sign_checkpoint  # noqa: E402

FULL_SIZE_BYTES = 6.4e9  # granite-4.0-h-micro bf16 safetensors


def make_model(root: Path, gib: float, files: int) -> int:
    root.mkdir(parents=True)
    (root / "config.json").write_text("{}")
    per = int(gib * 2**30 / files)
    chunk = os.urandom(16 * 2**20)
    for i in range(files):
        with open(root / f"model-{i + 1:05d}-of-{files:05d}.safetensors", "wb") as f:
            for _ in range(per // len(chunk)):
                f.write(chunk[: len(chunk) - i - 1] + bytes([i]))  # files differ from one another
    return sum(p.stat().st_size for p in root.iterdir())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results/signing.json")
    args = p.parse_args(argv)
    from tests.serve.signing_keys import key_pair

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = make_model(tmp / "model", args.gib, args.files)
        key = key_pair(tmp / "keys", "bench")
        rows = {}
        for algo in ("sha256", "blake3"):
            sig = tmp / f"{algo}.sig"
            t0 = time.perf_counter()
            sign_checkpoint(tmp / "model", key=key.private, signature=sig, algorithm=algo)
            sign_s = time.perf_counter() - t0
            policy = SignaturePolicy(file=str(sig), public_key=str(key.public))
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                done = verify_checkpoint(tmp / "model", policy)
                times.append(time.perf_counter() - t0)
            best, median = min(times), statistics.median(times)
            rows[algo] = {"hashing": done.hashing, "sign_s": round(sign_s, 2), "verify_best_s": round(best, 2),
                          "verify_median_s": round(median, 2), "gb_per_s_median": round(size / median / 1e9, 2),
                          "projected_full_size_s": round(FULL_SIZE_BYTES / (size / median), 1)}
            print(f"{algo}: {rows[algo]}", flush=True)
    report = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs", "load_average": os.getloadavg(),
              "bytes": size, "files": args.files, "full_size_bytes": FULL_SIZE_BYTES, "results": rows,
              "blake3_over_sha256": round(rows["sha256"]["verify_median_s"] / rows["blake3"]["verify_median_s"], 2)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
