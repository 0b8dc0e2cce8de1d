"""Memory soak through the real server (issue 20 item 4): waves of concurrent streams, a third of the clients
hanging up, chat requests sharing a long system prompt, one-off TGI prompts and short sessions in the mix. After
each wave (server idle): the workers' RSS and the bytes the prefix cache reports (device + host tiers + index),
from /metrics, less the KV blocks its device tier holds inside the preallocated pool (resident from the start);
RSS net of those bytes should stay flat after the first wave.

    python bench/soak.py [--waves 4] [--streams 32] [--out bench/results/soak-cpu.json]

Scaled down from the issue's 4 x 256 streams to what a loaded 2-core VM runs in minutes (say so when citing).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.http_load import WORDS, Server, machine_name  # noqa: E402

SID = "X-Amzn-SageMaker-Session-Id"
MIB = 1 << 20


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


SYSTEM = _words(random.Random(3), 150)


def _stream(url: str, path: str, body: dict, hang_up: bool, headers: dict | None = None) -> None:
    with requests.post(url + path, json={**body, "stream": True}, stream=True, timeout=600,
                       headers=headers or {}) as r:
        r.raise_for_status()
        for i, _ in enumerate(r.iter_lines()):
            if hang_up and i >= 2:
                return  # the client leaves mid-stream: the server cancels the sequence


def client(url: str, wave: int, k: int) -> None:
    rng = random.Random(1000 * wave + k)
    hang_up = k % 3 == 0
    kind = k % 4
    if kind == 0:  # one-off raw prompt
        _stream(url, "/invocations", {"inputs": _words(rng, rng.randint(40, 150)),
                                      "parameters": {"max_new_tokens": 16}}, hang_up)
    elif kind in (1, 2):  # a chat user of the shared system prompt
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": _words(rng, 20)}]
        _stream(url, "/v1/chat/completions", {"messages": msgs, "max_tokens": 16, "temperature": 0}, hang_up)
    else:  # a short session: two turns, then closed
        r = requests.post(url + "/invocations", json={"requestType": "NEW_SESSION"}, headers={SID: "NEW_SESSION"},
                          timeout=600)
        r.raise_for_status()
        sid = r.headers["X-Amzn-SageMaker-New-Session-Id"].split(";")[0]
        for turn in range(2):
            msgs = [{"role": "user", "content": _words(rng, 25)}]
            _stream(url, "/invocations", {"messages": msgs, "max_tokens": 16, "temperature": 0},
                    hang_up and turn == 1, {SID: sid})
        requests.post(url + "/invocations", json={"requestType": "CLOSE"}, headers={SID: sid}, timeout=600)


def scrape(url: str) -> dict:
    text = requests.get(url + "/metrics", timeout=60).text
    out = {}
    for name, key in (("granite_resident_memory_bytes", "rss"), ('granite_prefix_cache_bytes{tier="device"}', "device"),
                      ('granite_prefix_cache_bytes{tier="host"}', "host"), ('granite_prefix_cache_bytes{tier="index"}',
                                                                             "index"),
                      ("granite_prefix_cache_device_kv_bytes", "device_kv"),
                      ("granite_prefix_cache_snapshots_device", "snapshots_device"),
                      ("granite_prefix_cache_snapshots_host", "snapshots_host"),
                      ("granite_prefix_cache_evictions_total", "evictions"), ("granite_prefix_cache_hits_total", "hits"),
                      ("granite_running_sequences", "running")):
        m = re.search("^" + re.escape(name) + r" ([0-9.e+]+)$", text, re.M)
        out[key] = float(m.group(1)) if m else 0.0
    return out


def workers_rss(server: Server) -> float:
    """RSS of the server's worker processes (its descendants), from /proc: also for a build without the metric."""
    import psutil

    return float(sum(p.memory_info().rss for p in psutil.Process(server.proc.pid).children(recursive=True)))


def wait_idle(server: Server, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while True:
        time.sleep(2.5)  # the metrics sync every second
        m = scrape(server.url)
        if m["running"] == 0 or time.time() > deadline:
            m["rss_proc"] = workers_rss(server)
            return m


def run_soak(ckpt: Path, waves: int = 4, streams: int = 32, env: dict | None = None) -> dict:
    server = Server(ckpt, slots=32, env={"MAX_INPUT_TOKENS": "2048", "MAX_TOTAL_TOKENS": "4096",
                                         "MAX_QUEUED_REQUESTS": str(2 * streams), "SESSION_MAX": str(streams),
                                         **(env or {})})
    rows = []
    try:
        start = wait_idle(server)
        for wave in range(waves):
            t0 = time.time()
            threads = [threading.Thread(target=client, args=(server.url, wave, k)) for k in range(streams)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            m = wait_idle(server)
            # memory the cache took beyond the preallocated pool: its KV blocks there were resident from the start
            cache = m["device"] - m["device_kv"] + m["host"] + m["index"]
            rows.append({"wave": wave + 1, "wall_s": round(time.time() - t0, 1), "rss_mib": round(m["rss_proc"] / MIB, 1),
                         "rss_metric_mib": round(m["rss"] / MIB, 1),
                         "cache_mib": round(cache / MIB, 1), "index_mib": round(m["index"] / MIB, 2),
                         "reported_mib": round((m["device"] + m["host"] + m["index"]) / MIB, 1),
                         "net_mib": round((m["rss_proc"] - cache) / MIB, 1),
                         "snapshots": int(m["snapshots_device"] + m["snapshots_host"]),
                         "hits": int(m["hits"]), "evictions": int(m["evictions"])})
            print("soak", rows[-1], flush=True)
    finally:
        server.stop()
    # growth of RSS net of the cache bytes from each wave to the next (the first wave is the warm-up)
    growth = [round(100 * (b["net_mib"] - a["net_mib"]) / a["net_mib"], 2) for a, b in zip(rows, rows[1:],
                                                                                            strict=False)]
    return {"waves": waves, "streams_per_wave": streams, "start_rss_mib": round(start["rss_proc"] / MIB, 1),
            "per_wave": rows, "net_growth_pct_per_wave_after_first": growth,
            "max_net_growth_pct": max(growth, default=0.0), "target_pct": 1.0, "env": env or {}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--waves", type=int, default=4)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak-cpu.json"))
    a = p.parse_args(argv)
    from model.checkpoint.demo import build_checkpoint

    env = dict(e.split("=", 1) for e in a.env)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(Path(tmp) / "demo", preset="demo")
        report = run_soak(ckpt, a.waves, a.streams, env)
    report.update(machine=machine_name(), load_average_1m=round(os.getloadavg()[0], 2))
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "per_wave"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
