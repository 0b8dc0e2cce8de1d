"""Flask app factory: routes /ping /invocations /execution-parameters /v1/* /metrics.

`create_app(config, engine=None)` returns at once: the model is resolved and the engine loaded in a
background thread, so the port answers immediately and /ping says 503 until the engine is ready
(or forever, with the reason, if loading failed). gunicorn targets `serve.app:create_app()`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from model.types import EngineError, EngineNotReady
from serve import encoders as enc
from serve.config import Config, load_config
from serve.generate import Ctx, start, stream
from serve.handler import Service, load_user_module
from serve.metrics import Metrics
from serve.protocol import JSON_TYPES, Limits, ProtocolError, decode_json, media_type, parse_request

log = logging.getLogger("serve")
DEMO_NAME = "granite-4.0-h-micro-DEMO-random-weights"
CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
STREAM_HEADERS = {"X-Accel-Buffering": "no", "Cache-Control": "no-cache"}


class ServerState:
    """The engine and the handler service of this worker, created by a background loader."""

    def __init__(self, config: Config, engine: Any = None) -> None:
        self.config = config
        self.engine = engine
        self.service: Service | None = None
        self.model_name = getattr(engine, "model_name", None) or "granite"
        self.error: str | None = None
        self.ready = False
        self.metrics = Metrics()
        self.limits = Limits(default_max_new_tokens=config.server.default_max_new_tokens,
                             max_new_tokens=config.engine.max_total_tokens - 1)
        self._thread = threading.Thread(target=self._load, name="server-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _load(self) -> None:
        try:
            if self.engine is None:
                self.engine = self._create_engine()
            self.engine.start()  # idempotent
            if not self.engine.wait_ready():
                raise RuntimeError(self.engine.error or "the engine did not start")
            # code/inference.py sits at the top of the model dir (the checkpoint may be one level down)
            model_dir = Path(self.config.model.model_dir)
            if not (model_dir / "code" / "inference.py").is_file():
                model_dir = Path(getattr(self.engine, "model_dir", model_dir))
            service = Service(self.engine, model_dir, self.limits, self.metrics, load_user_module(model_dir))
            service.load_model()
            self.service = service
            self.ready = True
            log.info("server ready: model %s", self.model_name)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"[:500]
            log.exception("model load failed; /ping answers 503: %s", self.error)

    def _create_engine(self) -> Any:
        from model.engine import Engine
        from model.loader import resolve_model

        m = self.config.model
        resolved = resolve_model(m.model_dir, m.hf_model_id, m.hf_revision, m.hf_token, m.model_id, m.cache_dir,
                                 self.config.signature)
        name = resolved.name
        if resolved.is_demo:
            name = name if "demo" in name.lower() else DEMO_NAME
            log.warning("!" * 78)
            log.warning("DEMO MODEL: %s has RANDOM WEIGHTS; its text is meaningless. Set MODEL_DIR or "
                        "HF_MODEL_ID to serve Granite.", name)
            log.warning("!" * 78)
        self.model_name = name
        return Engine(resolved.path, self.config.engine, name)

    def live(self) -> bool:
        return self.ready and bool(getattr(self.engine, "ready", False))

    def require(self) -> Service:
        if not self.live() or self.service is None:
            raise EngineNotReady(self.error or "the model is still loading")
        return self.service

    def shutdown(self, timeout: float) -> None:
        self.ready = False
        if self.engine is not None:
            self.engine.shutdown(timeout=timeout)


def _error(status: int, message: str, error_type: str) -> Response:
    return Response(enc.dumps(enc.error_body(message, error_type)), status=status, mimetype="application/json")


def _guard_stream(body: Iterator[bytes], openai: bool) -> Iterator[bytes]:
    # Headers are already sent: a failure mid-stream becomes a final error event, never a traceback.
    try:
        yield from body
    except Exception as e:
        log.exception("stream failed")
        yield enc.sse(enc.error_body(f"internal error: {type(e).__name__}", "internal"), openai=openai)
    finally:
        close = getattr(body, "close", None)
        if close:
            close()


def _respond(body: Any, content_type: str, openai: bool = False) -> Response:
    if isinstance(body, (bytes, str)):
        return Response(body, mimetype=None, content_type=content_type)
    return Response(_guard_stream(body, openai), content_type=content_type, headers=STREAM_HEADERS,
                    direct_passthrough=True)


def create_app(config: Config | None = None, engine: Any = None) -> Flask:
    config = config or load_config()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=config.server.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = Flask("serve")
    app.config["MAX_CONTENT_LENGTH"] = config.server.max_payload_bytes
    state = ServerState(config, engine)
    app.extensions["granite"] = state

    @app.get("/ping")
    def ping():
        # Reads two flags: never waits behind generation or loading.
        if state.live():
            return Response(b"", status=200)
        return _error(503, state.error or "the model is still loading", "not_ready")

    @app.post("/invocations")
    def invocations():
        service = state.require()
        body = request.get_data(cache=False)
        out, content_type = service.invoke(body, request.headers.get("Content-Type"), request.headers.get("Accept"))
        return _respond(out, content_type)

    def openai_route(route: str):
        service = state.require()
        media = media_type(request.headers.get("Content-Type"))
        if media not in JSON_TYPES:
            raise ProtocolError(415, f"unsupported content type {media!r}: use application/json",
                                "unsupported_media_type")
        req = parse_request(decode_json(request.get_data(cache=False)), state.limits, route)
        ctx = Ctx(service.engine, state.model_name, state.metrics)
        if req.stream:
            return _respond(stream(ctx, req), "text/event-stream", openai=True)
        return _respond(enc.dumps(start(ctx, req).finish()), "application/json")

    app.post("/v1/chat/completions", endpoint="chat")(lambda: openai_route("chat"))
    app.post("/v1/completions", endpoint="completions")(lambda: openai_route("completions"))

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "granite-h-sagemaker"}]}

    @app.get("/execution-parameters")
    def execution_parameters():
        s = config.server
        slots = config.engine.max_concurrent_seqs
        if state.live():
            slots = state.engine.stats().get("total_slots", slots)
        return {"MaxConcurrentTransforms": s.max_concurrent_transforms or s.workers * slots,
                "BatchStrategy": s.batch_strategy, "MaxPayloadInMB": s.max_payload_bytes // (1024 * 1024)}

    @app.get("/metrics")
    def metrics():
        stats = state.engine.stats() if state.live() else {"ready": False}
        return Response(state.metrics.render(stats), content_type="text/plain; version=0.0.4; charset=utf-8")

    @app.errorhandler(ProtocolError)
    def protocol_error(e: ProtocolError):
        return _error(e.status, e.message, e.error_type)

    @app.errorhandler(EngineError)
    def engine_error(e: EngineError):
        return _error(e.status, str(e) or e.error_type, e.error_type)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        kind = {413: "payload_too_large", 404: "not_found", 405: "method_not_allowed"}.get(e.code, "http_error")
        message = f"body larger than {config.server.max_payload_bytes} bytes" if e.code == 413 else e.description
        return _error(e.code or 500, message, kind)

    @app.errorhandler(Exception)
    def internal_error(e: Exception):
        log.exception("request failed")
        return _error(500, f"internal error: {type(e).__name__}", "internal")

    @app.before_request
    def remember_route():
        g.route = request.url_rule.rule if request.url_rule is not None else "other"

    @app.after_request
    def finish(response: Response):
        attrs = request.headers.get(CUSTOM_ATTRIBUTES)
        if attrs is not None:
            response.headers[CUSTOM_ATTRIBUTES] = attrs
        state.metrics.request(getattr(g, "route", "other"), response.status_code)
        return response

    state.start()
    return app
