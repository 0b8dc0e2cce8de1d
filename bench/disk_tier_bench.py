"""What the prefix cache's disk tier costs (model/runtime/disk_tier.py), for a full-size Granite 4.0 H micro snapshot:
the engine loop's part of a spill (queueing it), the writer thread's part (file + checksum), and a restore's read
(one pass + checksum), from the page cache and cold (the file's pages dropped first with posix_fadvise), plus
the checksum alone. Payloads: the Mamba state alone (~37 MiB at bf16, `python -m bench.capacity` arithmetic) and
with the KV of a 4K-token conversation (+32 MiB at 8 KiB per token).

    python -m bench.disk_tier_bench [--dir /tmp/granite-h-snapshots-bench] [--reps 5] [--out bench/results/...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import blake3
import torch

from model.runtime.disk_tier import DiskTier

STATE_BYTES = 37 << 20  # ~36.6 MiB: 36 Mamba layers of conv + SSM state at bf16 (GRANITE.md)
KV_TOKEN_BYTES = 8 << 10  # 4 attention layers, K and V, bf16


def _to_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.numpy()).cast("B")


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure(folder: Path, payload: int, reps: int) -> dict:
    tier = DiskTier(folder, "bench", 1 << 40, _to_bytes, max_pending_bytes=1 << 40)
    buf = torch.randint(0, 255, (payload,), dtype=torch.uint8)
    enqueue, write, read_warm, read_cold, fsync = [], [], [], [], []
    for i in range(reps):
        ids = list(range(i, i + 64))
        t0 = time.perf_counter()
        key = tier.write("", ids, buf, payload)
        enqueue.append(time.perf_counter() - t0)
        tier.flush(600)
        write.append(time.perf_counter() - t0)
        path = folder / f"{key}.snap"
        t1 = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        fsync.append(time.perf_counter() - t1)
        t1 = time.perf_counter()
        got = tier.read(key, "", ids)
        read_warm.append(time.perf_counter() - t1)
        assert got is not None and len(got) == payload
        _drop_cache(path)
        t1 = time.perf_counter()
        assert tier.read(key, "", ids) is not None
        read_cold.append(time.perf_counter() - t1)
        tier.delete(key)
    data = buf.numpy().tobytes()
    t1 = time.perf_counter()
    for _ in range(reps):
        blake3.blake3(data).digest()
    checksum = (time.perf_counter() - t1) / reps
    tier.close()
    mib = payload / (1 << 20)

    def ms(xs):
        return round(statistics.median(xs) * 1e3, 2)

    return {"payload_mib": round(mib, 1), "engine_loop_enqueue_ms": ms(enqueue), "writer_ms": ms(write),
            "writer_mb_s": round(mib / statistics.median(write), 1), "fsync_after_ms": ms(fsync),
            "read_page_cache_ms": ms(read_warm), "read_cold_ms": ms(read_cold),
            "read_cold_mb_s": round(mib / statistics.median(read_cold), 1), "checksum_ms": round(checksum * 1e3, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/granite-h-snapshots-bench")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    folder = Path(a.dir)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        rows = [measure(folder, STATE_BYTES, a.reps), measure(folder, STATE_BYTES + 4096 * KV_TOKEN_BYTES, a.reps)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
              "torch": torch.__version__, "load_avg_1m": round(os.getloadavg()[0], 2), "folder": a.dir,
              "reps": a.reps, "results": rows}
    text = json.dumps(report, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
