"""One worker's server state: its engine (loaded in a background thread), the handler service, the request
limits the engine's context decides, metrics and the session table. serve/app.py creates it; the routes
(serve/routes.py) read it from the app.

The port answers at once: /ping says 503 until the engine is ready (or forever, with the reason, if loading
failed).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from model.types import EngineNotReady
from serve import affinity
from serve.adapters import AdapterRegistry
from serve.config import Config, with_worker_dir
from serve.engine_client import EngineClient
from serve.handler import Service, load_user_module
from serve.memory import Trimmer
from serve.metrics import Metrics
from serve.protocol import Limits
from serve.sessions import Session, SessionTable

log = logging.getLogger("serve")


class ServerState:
    """The engine and the handler service of this worker, created by a background loader."""

    def __init__(self, config: Config, engine: EngineClient | None = None) -> None:
        self.config = config
        self.engine = engine
        self.service: Service | None = None
        self.model_name = engine.model_name if engine is not None else "granite"
        self.error: str | None = None
        self.ready = False
        self.metrics = Metrics(config.server.metrics_dir)
        self.limits = Limits()  # set from the engine's context limits once it is loaded
        me = affinity.this_worker
        s = config.server
        index = me.index if me is not None else 0
        # the disk tier: this worker's folder (a respawned worker takes over the index, and so the folder)
        self.config = config = with_worker_dir(config, index)
        e = config.engine
        store = os.path.join(e.snapshot_disk_dir, "sessions") if e.prefix_cache and e.snapshot_disk_bytes else None
        self.sessions = SessionTable(index, s.session_ttl_s, s.session_max, on_end=self._session_ended,
                                     on_change=self.metrics.sessions_open.set, store_dir=store)
        self.link: affinity.WorkerLink | None = None  # set by create_app with 2+ workers
        self.trimmer: Trimmer | None = None  # serve/memory.py, once the engine is loaded
        self.adapters = AdapterRegistry(config.adapters, config.signature)  # LoRA: this worker's side of the registry
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._load, name="server-load", daemon=True)

    def start(self) -> None:
        self._thread.start()
        threading.Thread(target=self._sweep_sessions, name="session-expiry", daemon=True).start()

    def _sweep_sessions(self) -> None:
        # Idle sessions past their expiry release their pinned state even when no request comes.
        while not self._stopping.wait(min(10.0, self.sessions.ttl_s / 4)):
            self.sessions.sweep()

    def _session_ended(self, session: Session) -> None:
        if self.engine is not None:
            self.engine.release_session(session.id)

    def _load(self) -> None:
        try:
            if self.engine is None:
                self.engine = self._create_engine()
            engine = self.engine
            engine.start()  # idempotent
            if not engine.wait_ready():
                raise RuntimeError(engine.error or "the engine did not start")
            self.limits = Limits.from_config(engine.config, self.config.server.default_max_new_tokens,
                                             max_n=self.config.server.max_n)
            for sid in self.sessions.ended_ids():  # ended while the engine was not there (a restart): unpin
                engine.release_session(sid)
            # code/inference.py sits at the top of the model dir (the checkpoint may be one level down)
            model_dir = Path(self.config.model.model_dir)
            if not (model_dir / "code" / "inference.py").is_file():
                model_dir = Path(engine.model_dir)
            service = Service(engine, model_dir, self.limits, self.metrics, load_user_module(model_dir))
            service.load_model()
            self.service = service
            if engine.config.max_loras > 0:
                self.adapters.discover(engine)  # /opt/ml/model/adapters/<name>/ and ADAPTERS
            self.ready = True
            self.metrics.start_sync(engine.stats)
            if self.config.server.memory_trim:
                self.trimmer = Trimmer(engine.stats)
                self.trimmer.start()
            log.info("server ready: model %s", self.model_name)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"[:500]
            log.exception("model load failed; /ping answers 503: %s", self.error)

    def _create_engine(self) -> EngineClient:
        from serve.engine_setup import build_engine

        engine, self.config = build_engine(self.config)
        self.model_name = engine.model_name
        return engine

    def live(self) -> bool:
        return self.ready and self.engine is not None and self.engine.ready

    def require(self) -> Service:
        if not self.live() or self.service is None:
            raise EngineNotReady(self.error or "the model is still loading")
        return self.service

    def shutdown(self, timeout: float) -> None:
        self.ready = False
        self._stopping.set()
        self.metrics.stop()
        if self.trimmer is not None:
            self.trimmer.stop()
        if self.link is not None:
            self.link.stop()
        if self.engine is not None:
            self.engine.shutdown(timeout=timeout)
