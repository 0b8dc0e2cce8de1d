"""Prometheus text-format metrics for one worker (no client library: counters, gauges, histograms).

Request counters and latency histograms are recorded by the server; queue depth, running sequences,
free slots and token totals are read from engine.stats() at scrape time.
"""

from __future__ import annotations

import threading
from collections import defaultdict

# seconds; time to first token / time per output token
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
PREFIX = "granite_"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last = +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, n in zip(self.buckets + (float("inf"),), self.counts, strict=True):
            acc += n
            le = "+Inf" if b == float("inf") else repr(b)
            out.append(f'{name}_bucket{{le="{le}"}} {acc}')
        out += [f"{name}_sum {self.sum}", f"{name}_count {acc}"]
        return out


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (route, status) -> count
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.client_disconnects = 0

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def timing(self, ttft_s: float | None, tpot_s: float | None) -> None:
        with self._lock:
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
            if tpot_s is not None:
                self.tpot.observe(tpot_s)

    def disconnect(self) -> None:
        with self._lock:
            self.client_disconnects += 1

    def render(self, stats: dict | None) -> str:
        p = PREFIX
        lines = [f"# HELP {p}requests_total HTTP requests by route and status.", f"# TYPE {p}requests_total counter"]
        with self._lock:
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f'{p}requests_total{{route="{route}",status="{status}"}} {n}')
            lines += [f"# TYPE {p}client_disconnects_total counter",
                      f"{p}client_disconnects_total {self.client_disconnects}"]
            lines += [f"# HELP {p}time_to_first_token_seconds Time from submit to the first token.",
                      f"# TYPE {p}time_to_first_token_seconds histogram"]
            lines += self.ttft.lines(f"{p}time_to_first_token_seconds")
            lines += [f"# HELP {p}time_per_output_token_seconds Mean time between tokens of a request.",
                      f"# TYPE {p}time_per_output_token_seconds histogram"]
            lines += self.tpot.lines(f"{p}time_per_output_token_seconds")
        s = stats or {}
        gauges = {"ready": int(bool(s.get("ready"))), "queue_depth": s.get("waiting", 0),
                  "running_sequences": s.get("running", 0), "free_slots": s.get("free_slots", 0),
                  "total_slots": s.get("total_slots", 0)}
        for name, value in gauges.items():
            lines += [f"# TYPE {p}{name} gauge", f"{p}{name} {value}"]
        for key in ("prompt_tokens_total", "generated_tokens_total", "requests_total", "step_errors_total"):
            if key in s:
                name = f"{p}engine_{key}"
                lines += [f"# TYPE {name} counter", f"{name} {s[key]}"]
        finished = s.get("finished_total") or {}
        if finished:
            lines.append(f"# TYPE {p}engine_finished_total counter")
            lines += [f'{p}engine_finished_total{{reason="{r}"}} {n}' for r, n in sorted(finished.items())]
        lines += prefix_cache_lines(s.get("prefix_cache"))
        return "\n".join(lines) + "\n"


# engine.stats()["prefix_cache"] (model/prefix_cache.py) -> metric name, type
_PREFIX_CACHE = {"hits": "counter", "hits_host": "counter", "misses": "counter", "evictions": "counter", "demotions": "counter",
                 "tokens_reused": "counter", "snapshots_taken": "counter", "snapshots_device": "gauge",
                 "snapshots_host": "gauge", "kv_blocks_held": "gauge", "sessions": "gauge"}


def prefix_cache_lines(pc: dict | None) -> list[str]:
    if not pc:
        return []
    p, out = f"{PREFIX}prefix_cache_", []
    for key, kind in _PREFIX_CACHE.items():
        name = f"{p}{key}_total" if kind == "counter" else f"{p}{key}"
        out += [f"# TYPE {name} {kind}", f"{name} {pc[key]}"]
    out.append(f"# TYPE {p}bytes gauge")
    out += [f'{p}bytes{{tier="{t}"}} {pc["bytes_" + t]}' for t in ("device", "host")]
    return out
