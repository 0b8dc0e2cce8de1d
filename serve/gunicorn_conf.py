"""gunicorn settings: `gunicorn -c python:serve.gunicorn_conf "serve.app:create_app()"` (python -m serve serve).

One gthread worker per GPU (each its own engine replica, pinned to its GPU through CUDA_VISIBLE_DEVICES
before torch starts), many threads so hundreds of open streams never starve /ping, a long timeout
(gthread workers heartbeat from their main loop, so this only catches a hung worker), and a graceful
SIGTERM: stop accepting, finish in-flight requests within graceful_timeout, then drain the engine.
The app (and so torch and the model) is created in the worker, never in the master.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading

from serve import affinity
from serve.config import load_config

_cfg = load_config()
_host = _cfg.server.host
bind = [f"[{_host}]:{_cfg.server.port}" if ":" in _host else f"{_host}:{_cfg.server.port}"]
wsgi_app = "serve.app:create_app()"
worker_class = "gthread"
workers = _cfg.server.workers
threads = _cfg.threads
timeout = _cfg.server.timeout_s
graceful_timeout = _cfg.server.graceful_timeout_s
keepalive = 75  # longer than typical client/LB idle timeouts (60 s), so pooled connections stay valid
preload_app = False
control_socket_disable = True  # gunicorn >= 25: no runtime-control socket (read-only homes, parallel servers)
loglevel = _cfg.server.log_level.lower()
errorlog = "-"
accesslog = "-" if _cfg.server.log_level == "DEBUG" else None
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # heartbeat file off slow disks
_GPUS = _cfg.server.gpu_ids
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
    worker.worker_index = next((i for i in range(workers) if i not in taken), len(server.WORKERS) % workers)


def post_fork(server, worker):
    # Worker, before the app (and torch) is imported: see only this worker's GPU.
    index = worker.worker_index
    if _GPUS:
        gpu = _GPUS[index % len(_GPUS)]
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        log.info("worker %s pinned to GPU %s", worker.pid, gpu)
    if workers > 1:
        affinity.this_worker = affinity.WorkerId(index, workers, _RUN_DIR)


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
    drain_s = max(1.0, graceful_timeout - 3.0)

    def on_term(signum, frame):
        threading.Thread(target=_shutdown_engine, args=(worker, drain_s), name="drain", daemon=True).start()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_term)


def worker_int(worker):
    # SIGINT/SIGQUIT: stop quickly, ending what is still running.
    _shutdown_engine(worker, timeout=2.0)


def worker_exit(server, worker):
    # After gthread has waited (graceful_timeout) for in-flight requests: stop the engine loop.
    _shutdown_engine(worker, timeout=5.0)
