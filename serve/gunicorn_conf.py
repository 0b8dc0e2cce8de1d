"""gunicorn settings: `gunicorn -c python:serve.gunicorn_conf "serve.app:create_app()"` (python -m serve serve).

One gthread worker per GPU (each its own engine replica, pinned to its GPU through CUDA_VISIBLE_DEVICES
before torch starts), many threads so hundreds of open streams never starve /ping, a long timeout
(gthread workers heartbeat from their main loop, so this only catches a hung worker), and a graceful
SIGTERM: stop accepting, finish in-flight requests within graceful_timeout, then drain the engine.
The app (and so torch and the model) is created in the worker, never in the master.
"""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
import threading

from serve import affinity, memory
from serve.config import gunicorn_settings, load_config, pin_gpu

_cfg = load_config()
globals().update(gunicorn_settings(_cfg))  # bind, workers, threads, timeouts, logging: see serve/config.py
_GPUS = _cfg.server.gpu_ids
_WORKERS = _cfg.server.workers
_RUN_DIR: str | None = None
log = logging.getLogger("gunicorn.error")


def on_starting(server):
    # Master: a folder for the workers' private sockets (session forwarding, serve/affinity.py).
    global _RUN_DIR
    _RUN_DIR = tempfile.mkdtemp(prefix="granite-h-workers-")


def on_exit(server):
    if _RUN_DIR:
        shutil.rmtree(_RUN_DIR, ignore_errors=True)


def pre_fork(server, worker):
    # Master: give the new worker an index (and so a GPU) no living worker holds: a respawned worker
    # takes over the index of the one that died.
    taken = {getattr(w, "worker_index", None) for w in server.WORKERS.values()}
    worker.worker_index = next((i for i in range(_WORKERS) if i not in taken), len(server.WORKERS) % _WORKERS)


def post_fork(server, worker):
    # Worker, before the app (and torch) is imported: see only this worker's GPU; its malloc arenas bounded.
    memory.limit_arenas(_cfg.server.memory_arenas)
    index = worker.worker_index
    if _GPUS:
        gpu = _GPUS[index % len(_GPUS)]
        pin_gpu(gpu)
        log.info("worker %s pinned to GPU %s", worker.pid, gpu)
    if _WORKERS > 1 and _RUN_DIR:
        affinity.this_worker = affinity.WorkerId(index, _WORKERS, _RUN_DIR)


def _shutdown_engine(worker, timeout: float) -> None:
    app = getattr(worker, "wsgi", None)
    state = getattr(app, "extensions", {}).get("granite") if app is not None else None
    if state is not None:
        state.shutdown(timeout=timeout)


def post_worker_init(worker):
    # SIGTERM (scale-in, update, docker stop): gthread stops accepting and waits graceful_timeout for
    # in-flight requests, then the master SIGKILLs the worker. Drain the engine on a deadline shorter
    # than that, so a stream that cannot finish in time still ends with an error event, not a cut.
    previous = signal.getsignal(signal.SIGTERM)
    drain_s = max(1.0, _cfg.server.graceful_timeout_s - 3.0)

    def on_term(signum, frame):
        threading.Thread(target=_shutdown_engine, args=(worker, drain_s), name="drain", daemon=True).start()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_term)


def worker_int(worker):
    # SIGINT/SIGQUIT: stop quickly, ending what is still running.
    _shutdown_engine(worker, timeout=2.0)


def child_exit(server, worker):
    # Master: a dead worker's gauges leave the instance totals (its counters stay counted).
    if _cfg.server.metrics_dir:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid, path=_cfg.server.metrics_dir)


def worker_exit(server, worker):
    # After gthread has waited (graceful_timeout) for in-flight requests: stop the engine loop.
    _shutdown_engine(worker, timeout=5.0)
