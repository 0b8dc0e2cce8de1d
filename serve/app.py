"""Flask app factory: routes /ping /invocations /execution-parameters /v1/* /metrics.

`create_app(config, engine=None)` returns at once: the model is resolved and the engine loaded in a
background thread, so the port answers immediately and /ping says 503 until the engine is ready
(or forever, with the reason, if loading failed). gunicorn targets `serve.app:create_app()`.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from model.types import EngineNotReady, RequestError
from serve import affinity, kinds, session_route
from serve import encoders as enc
from serve.config import Config, load_config
from serve.engine_client import EngineClient
from serve.generate import start, stream
from serve.handler import Service, load_user_module
from serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from serve.metrics import Metrics
from serve.prompts import Ctx
from serve.protocol import JSON_TYPES, Limits, ProtocolError, decode_json, media_type
from serve.sessions import SESSION_HEADER, SessionTable
from serve.watch import DISCONNECTED, watching

log = logging.getLogger("serve")
CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
STREAM_HEADERS = {"X-Accel-Buffering": "no", "Cache-Control": "no-cache"}
DRAIN_MIN_BYTES = 64 * 1024 * 1024  # an answered request's unread body is read and dropped up to this (or 2x limit)


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
        self.sessions = SessionTable(me.index if me is not None else 0, s.session_ttl_s, s.session_max,
                                     on_end=self._session_ended, on_change=self.metrics.sessions_open.set)
        self.link: affinity.WorkerLink | None = None  # set by create_app with 2+ workers
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._load, name="server-load", daemon=True)

    def start(self) -> None:
        self._thread.start()
        threading.Thread(target=self._sweep_sessions, name="session-expiry", daemon=True).start()

    def _sweep_sessions(self) -> None:
        # Idle sessions past their expiry release their pinned state even when no request comes.
        while not self._stopping.wait(min(10.0, self.sessions.ttl_s / 4)):
            self.sessions.sweep()

    def _session_ended(self, session) -> None:
        if self.engine is not None:
            self.engine.release_session(session.id)

    def _load(self) -> None:
        try:
            engine = self.engine = self.engine or self._create_engine()
            engine.start()  # idempotent
            if not engine.wait_ready():
                raise RuntimeError(engine.error or "the engine did not start")
            total = engine.config.max_total_tokens
            self.limits = Limits(default_max_new_tokens=min(self.config.server.default_max_new_tokens, total - 1),
                                 max_new_tokens=total - 1)
            # code/inference.py sits at the top of the model dir (the checkpoint may be one level down)
            model_dir = Path(self.config.model.model_dir)
            if not (model_dir / "code" / "inference.py").is_file():
                model_dir = Path(engine.model_dir)
            service = Service(engine, model_dir, self.limits, self.metrics, load_user_module(model_dir))
            service.load_model()
            self.service = service
            self.ready = True
            self.metrics.start_sync(engine.stats)
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
        if self.link is not None:
            self.link.stop()
        if self.engine is not None:
            self.engine.shutdown(timeout=timeout)


def _error(e: BaseException) -> Response:
    status, body = enc.error_of(e)
    return Response(enc.json_body(body), status=status, mimetype="application/json")


def _guard_stream(body: Iterator[bytes], openai: bool) -> Iterator[bytes]:
    # Headers are already sent: a failure mid-stream becomes a final error event, never a traceback.
    try:
        yield from body
    except Exception as e:
        log.exception("stream failed")
        yield enc.sse(enc.error_of(e)[1], openai=openai)
    finally:
        close = getattr(body, "close", None)
        if close:
            close()


def _respond(body: Any, content_type: str, openai: bool = False) -> Response:
    if isinstance(body, (bytes, str)):
        return Response(body, mimetype=None, content_type=content_type)
    return Response(_guard_stream(body, openai), content_type=content_type, headers=STREAM_HEADERS,
                    direct_passthrough=True)


def _drain_unread_body(response: Response, limit: int) -> None:
    # A response sent before the body was read (413 from the headers, 415, 503 while loading): read and
    # drop the rest, so a client that writes its whole body before reading gets the answer, not a broken
    # pipe from a connection closed under it. Past `limit` the connection is closed instead.
    if request.content_length is None and "chunked" not in request.headers.get("Transfer-Encoding", "").lower():
        return  # no body, or one we cannot delimit
    stream = request.environ.get("wsgi.input")
    left = limit
    while stream is not None and left > 0:
        chunk = stream.read(min(1 << 16, left))
        if not chunk:
            return
        left -= len(chunk)
    response.headers["Connection"] = "close"


def create_app(config: Config | None = None, engine: EngineClient | None = None) -> Flask:
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
        return _error(EngineNotReady(state.error or "the model is still loading"))

    def watched(view):
        # Non-streaming work of this request is cancelled when its client hangs up or its deadline passes.
        @functools.wraps(view)
        def run(*args):
            with watching(request.environ.get("gunicorn.socket"), config.server.request_timeout_s) as w:
                try:
                    return view(*args)
                finally:
                    if w.reason == DISCONNECTED:
                        state.metrics.disconnect()
        return run

    @app.post("/invocations")
    @watched
    def invocations():
        service = state.require()
        headers = request.headers
        session_id = headers.get(SESSION_HEADER)
        if session_id is not None:  # SageMaker stateful sessions (serve/session_route.py)
            return session_route.invocation(
                session_id, state.sessions, state.link, service.engine,
                lambda body: service.invoke(body, headers.get("Content-Type"), headers.get("Accept")), _respond,
                state.metrics.session_forwards.inc)
        body = request.get_data(cache=False)
        out, content_type = service.invoke(body, headers.get("Content-Type"), headers.get("Accept"))
        return _respond(out, content_type)

    @watched
    def openai_route(kind: str):
        service = state.require()
        media = media_type(request.headers.get("Content-Type"))
        if media not in JSON_TYPES:
            raise ProtocolError(415, f"unsupported content type {media!r}: use application/json",
                                "unsupported_media_type")
        req = kinds.parse_request(decode_json(request.get_data(cache=False)), state.limits, kind)
        ctx = Ctx(service.engine, state.model_name, state.metrics)
        if req.stream:
            return _respond(stream(ctx, req), "text/event-stream", openai=True)
        return _respond(enc.json_body(start(ctx, req).finish()), "application/json")

    for k in kinds.KINDS:
        if k.route is not None:
            app.post(f"/v1/{k.route}", endpoint=k.name)(functools.partial(openai_route, k.name))

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
        return Response(state.metrics.render(stats), content_type=METRICS_CONTENT_TYPE)

    @app.errorhandler(RequestError)
    def request_error(e: RequestError):
        return _error(e)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        kind = {413: "payload_too_large", 404: "not_found", 405: "method_not_allowed"}.get(e.code, "http_error")
        message = f"body larger than {config.server.max_payload_bytes} bytes" if e.code == 413 else e.description
        return _error(RequestError(message or kind, e.code or 500, kind))

    @app.errorhandler(Exception)
    def internal_error(e: Exception):
        log.exception("request failed")
        return _error(e)

    @app.before_request
    def remember_route():
        g.route = request.url_rule.rule if request.url_rule is not None else "other"

    @app.after_request
    def finish(response: Response):
        attrs = request.headers.get(CUSTOM_ATTRIBUTES)
        if attrs is not None:
            response.headers[CUSTOM_ATTRIBUTES] = attrs
        state.metrics.request(getattr(g, "route", "other"), response.status_code)
        _drain_unread_body(response, max(DRAIN_MIN_BYTES, 2 * config.server.max_payload_bytes))
        return response

    if affinity.this_worker is not None:  # several workers: sessions of the others are forwarded to them
        state.link = affinity.WorkerLink(affinity.this_worker, app, config.server.timeout_s)
        state.link.start()
    state.start()
    return app
