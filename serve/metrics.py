"""Prometheus metrics through prometheus-client, one scrape for the whole instance.

Under gunicorn (`python -m serve serve`) every worker is its own engine replica; prometheus-client's
multiprocess mode (PROMETHEUS_MULTIPROC_DIR, prepared by serve/config.py before the workers fork) has
each worker write its values to files there and a scrape, answered by any worker, adds them up: request
counters and histograms summed, gauges summed over live workers (ready: the minimum). Without that
directory (the Flask test client, one process) the values are this process's own.

Engine numbers (queue depth, running sequences, slots, token and finish counters) come from
engine.stats(): each worker copies them into its metrics every SYNC_S seconds and before a scrape.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

# seconds; time to first token / time per output token
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
PREFIX = "granite_"
SYNC_S = 1.0
CONTENT_TYPE = CONTENT_TYPE_LATEST
GAUGES = {"queue_depth": "waiting", "running_sequences": "running", "free_slots": "free_slots",
          "total_slots": "total_slots"}  # metric -> engine.stats() key
ENGINE_COUNTERS = ("prompt_tokens_total", "generated_tokens_total", "requests_total", "step_errors_total")
# engine.stats()["prefix_cache"] (model/engine/prefix_cache.py): counters, gauges, and bytes per tier
PREFIX_COUNTERS = ("hits", "hits_host", "misses", "evictions", "demotions", "tokens_reused", "snapshots_taken",
                   "snapshots_boundary", "evictions_unused",
                   "hits_disk", "spills", "sessions_not_persisted", "disk_writes", "disk_write_errors",
                   "disk_writes_refused", "disk_reads", "disk_bytes_written", "disk_bytes_read", "disk_write_seconds",
                   "disk_read_seconds", "disk_discarded", "disk_discarded_truncated", "disk_discarded_corrupt",
                   "disk_discarded_foreign")  # disk_*: model/runtime/disk_tier.py
PREFIX_GAUGES = ("snapshots_device", "snapshots_host", "snapshots_disk", "kv_blocks_held", "sessions", "index_nodes",
                 "disk_pending_bytes", "disk_read_buffer_bytes")
# bytes_<tier>; index: the snapshots' keys in host memory (an estimate)
PREFIX_TIERS = ("device", "host", "disk", "index")


def resident_bytes() -> int:
    """This process's resident memory (Linux /proc/self/statm); 0 where there is none."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Metrics:
    def __init__(self, multiproc_dir: str | None = None) -> None:
        self.multiproc_dir = multiproc_dir
        r = self.registry = CollectorRegistry()  # per app: tests build many apps in one process
        p = PREFIX
        self.requests = Counter(f"{p}requests_total", "HTTP requests by route and status.", ["route", "status"],
                                registry=r)
        self.disconnects = Counter(f"{p}client_disconnects_total", "Clients that left before their answer.",
                                   registry=r)
        self.ttft = Histogram(f"{p}time_to_first_token_seconds", "Time from submit to the first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(f"{p}time_per_output_token_seconds", "Mean time between tokens of a request.",
                              buckets=TPOT_BUCKETS, registry=r)
        self.ready = Gauge(f"{p}ready", "1 when every worker's engine is ready.", registry=r,
                           multiprocess_mode="livemin")
        self.gauges = {name: Gauge(f"{p}{name}", f"Engine {key} (all workers).", registry=r,
                                   multiprocess_mode="livesum") for name, key in GAUGES.items()}
        self.engine = {key: Counter(f"{p}engine_{key}", f"Engine {key.removesuffix('_total')}.", registry=r)
                       for key in ENGINE_COUNTERS}
        self.finished = Counter(f"{p}engine_finished_total", "Sequences finished, by reason.", ["reason"],
                                registry=r)
        self.prefix = {k: Counter(f"{p}prefix_cache_{k}", f"Prefix cache {k} (model/engine/prefix_cache.py).", registry=r)
                       for k in PREFIX_COUNTERS}
        self.prefix_gauges = {k: Gauge(f"{p}prefix_cache_{k}", f"Prefix cache {k}.", registry=r,
                                       multiprocess_mode="livesum") for k in PREFIX_GAUGES}
        self.prefix_bytes = Gauge(f"{p}prefix_cache_bytes", "Bytes of state snapshots, by tier (index: their keys).",
                                  ["tier"], registry=r, multiprocess_mode="livesum")
        self.prefix_pool_kv = Gauge(f"{p}prefix_cache_device_kv_bytes", "Of the device tier's bytes: the KV blocks "
                                    "snapshots hold in the preallocated pool (no memory of their own).", registry=r,
                                    multiprocess_mode="livesum")
        self.rss = Gauge(f"{p}resident_memory_bytes", "Resident memory of the workers (RSS, /proc/self/statm).",
                         registry=r, multiprocess_mode="livesum")
        self.sessions_open = Gauge(f"{p}sessions_open", "Open SageMaker stateful sessions.", registry=r,
                                   multiprocess_mode="livesum")
        self.session_forwards = Counter(f"{p}session_forwards", "Session requests forwarded to the worker that "
                                        "holds the session.", registry=r)
        self._seen: dict[str, float] = {}  # engine counter -> value already added
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # ---- recorded by the server ----
    def request(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def timing(self, ttft_s: float | None, tpot_s: float | None) -> None:
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)

    def disconnect(self) -> None:
        self.disconnects.inc()

    # ---- copied from engine.stats() ----
    def sync(self, stats: dict | None) -> None:
        s = stats or {}
        with self._lock:
            self.ready.set(int(bool(s.get("ready"))))
            for name, key in GAUGES.items():
                self.gauges[name].set(s.get(key, 0))
            counts = {k: s[k] for k in ENGINE_COUNTERS if k in s}
            pc = s.get("prefix_cache") or {}
            counts.update({f"prefix:{k}": pc[k] for k in PREFIX_COUNTERS if k in pc})
            for k in PREFIX_GAUGES:
                self.prefix_gauges[k].set(pc.get(k, 0))
            for tier in PREFIX_TIERS:
                self.prefix_bytes.labels(tier=tier).set(pc.get(f"bytes_{tier}", 0))
            self.prefix_pool_kv.set(pc.get("bytes_device_kv", 0))
            self.rss.set(resident_bytes())
            counts.update({f"finished:{r}": n for r, n in (s.get("finished_total") or {}).items()})
            for key, value in counts.items():
                # labels() shows a reason from the start (at 0), so a scrape always finds every reason
                if key.startswith("finished:"):
                    metric = self.finished.labels(reason=key[9:])
                else:
                    metric = self.prefix[key[7:]] if key.startswith("prefix:") else self.engine[key]
                delta = value - self._seen.get(key, 0)
                if delta > 0:  # counters only grow (a restarted engine starts a new worker, new files)
                    metric.inc(delta)
                    self._seen[key] = value

    def start_sync(self, stats: Callable[[], dict]) -> None:
        def run() -> None:
            while not self._stop.wait(SYNC_S):
                try:
                    self.sync(stats())
                except Exception:  # a scrape must never take the worker down
                    pass

        threading.Thread(target=run, name="metrics-sync", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def render(self, stats: dict | None) -> bytes:
        self.sync(stats)
        if self.multiproc_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiproc_dir)
        return generate_latest(merged)
