"""Flask app factory: routes /ping /invocations /execution-parameters /v1/* /metrics (serve/routes.py).

`create_app(config, engine=None)` returns at once: the model is resolved and the engine loaded in a
background thread (serve/server_state.py), so the port answers immediately and /ping says 503 until the
engine is ready (or forever, with the reason, if loading failed). gunicorn targets `serve.app:create_app()`.
"""

from __future__ import annotations

import logging

from flask import Flask

from serve import affinity, routes
from serve.config import Config, load_config
from serve.engine_client import EngineClient
from serve.server_state import ServerState


def create_app(config: Config | None = None, engine: EngineClient | None = None) -> Flask:
    config = config or load_config()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=config.server.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = Flask("serve")
    app.config["MAX_CONTENT_LENGTH"] = config.server.max_payload_bytes
    state = app.extensions["granite"] = ServerState(config, engine)
    routes.register(app)
    if affinity.this_worker is not None:  # several workers: sessions of the others are forwarded to them
        state.link = affinity.WorkerLink(affinity.this_worker, app, config.server.timeout_s)
        state.link.start()
    state.start()
    return app
