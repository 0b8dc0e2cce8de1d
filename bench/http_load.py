"""The benchmarks' HTTP side: a server subprocess on a free port, streaming clients, deterministic prompts, and
the aggregate (tokens/s over the wall time, TTFT / TPOT percentiles at the client). Used by bench/run.py
(`make bench`) and bench/mid.py; its own module so that neither imports the other."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the model reads a long conversation and answers with care about state memory tokens "
         "granite hybrid mamba attention layers serve many requests at once on one machine").split()


def machine_name() -> str:
    """Where a bench ran, for its report: host, cores and the CPU model (from /proc/cpuinfo)."""
    cpu = "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node() or 'host'} ({os.cpu_count()} cores, {cpu})"


def prompts(n: int, seed: int = 0) -> list[str]:
    """Deterministic prompts of 20-60 words."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(n)]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, ckpt: Path, slots: int, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        # a fresh disk tier folder: snapshots (and sessions) of an earlier run must not be found by this one
        self._snapshots = tempfile.mkdtemp(prefix="granite-bench-snapshots-")
        env = {**os.environ, "MODEL_DIR": str(ckpt), "MAX_CONCURRENT_SEQS": str(slots),
               "DTYPE": "float32", "LOG_LEVEL": "WARNING", "SNAPSHOT_DISK_DIR": self._snapshots, **(env or {})}
        env.pop("MODEL_ID", None)
        env.pop("HF_MODEL_ID", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "serve", "serve", "--host", "127.0.0.1",
                                      "--port", str(self.port)], cwd=ROOT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if requests.get(self.url + "/ping", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("server exited during start")
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("server not ready after 300 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self._snapshots, ignore_errors=True)


def stream_one(url: str, text: str, max_new: int) -> dict:
    """One TGI streaming request; returns tokens, TTFT and per-token gaps measured at the client."""
    body = {"inputs": text, "parameters": {"max_new_tokens": max_new}, "stream": True}
    t0 = time.perf_counter()
    stamps: list[float] = []
    with requests.post(url + "/invocations", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith(b"data:"):
                ev = json.loads(line[5:])
                if "token" in ev:
                    stamps.append(time.perf_counter())
    return {"tokens": len(stamps), "ttft": stamps[0] - t0 if stamps else float("nan"),
            "tpot": [b - a for a, b in zip(stamps, stamps[1:], strict=False)]}


def run_concurrency(url: str, texts: list[str], conc: int, max_new: int) -> dict:
    """Send all texts with `conc` in flight at once; aggregate tokens/s over the wall time."""
    results: list[dict] = []
    lock = threading.Lock()
    todo = list(texts)

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                t = todo.pop()
            r = stream_one(url, t, max_new)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(conc)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] * 1000 for r in results]
    tpot = [g * 1000 for r in results for g in r["tpot"]]
    return {"requests": len(results), "tokens": tokens, "wall_s": round(wall, 3),
            "engine_tok_s": tokens / wall,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99)}
