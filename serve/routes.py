"""The HTTP routes of one worker, and how their answers go out (Flask views; the state is the app's).

    GET  /ping                   200 once the engine is ready; 503 with the reason otherwise (two flags: never waits)
    POST /invocations            serve/handler.py (code/inference.py hooks); with a session header serve/session_route.py
    POST /v1/<route>             each request kind with an OpenAI route (serve/kinds), straight to generate
    POST /adapters, DELETE /adapters/<name>, GET /adapters   LoRA adapters (serve/adapters.py); a request's adapter
                                 header is in effect around /invocations and /v1/<route>
    GET  /v1/models (the base and every adapter), /execution-parameters, /metrics
Errors are JSON with their status, never HTML or a trace; a stream that fails after its headers ends with an
error event. The custom-attributes header is echoed, every answer is counted by route and status, and an
answered request's unread body is drained so the client reads the answer rather than a broken pipe.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException

from model.types import EngineNotReady, RequestError
from serve import adapters, kinds, session_route
from serve import encoders as enc
from serve.generate import start, stream
from serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from serve.prompts import Ctx
from serve.protocol import JSON_TYPES, ProtocolError, decode_json, media_type
from serve.server_state import ServerState
from serve.sessions import SESSION_HEADER
from serve.watch import DISCONNECTED, watching

log = logging.getLogger("serve")
CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
STREAM_HEADERS = {"X-Accel-Buffering": "no", "Cache-Control": "no-cache"}
DRAIN_MIN_BYTES = 64 * 1024 * 1024  # an answered request's unread body is read and dropped up to this (or 2x limit)


def _state() -> ServerState:
    return current_app.extensions["granite"]


# ---- answers ----

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
        close = getattr(body, "close", None)  # a generator, or any iterator a user's output_fn returned
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


# ---- views ----

def ping() -> Response:
    # Reads two flags: never waits behind generation or loading.
    state = _state()
    if state.live():
        return Response(b"", status=200)
    return _error(EngineNotReady(state.error or "the model is still loading"))


def watched(view: Callable[..., Response]) -> Callable[..., Response]:
    # Non-streaming work of this request is cancelled when its client hangs up or its deadline passes.
    @functools.wraps(view)
    def run(*args):
        state = _state()
        with watching(request.environ.get("gunicorn.socket"), state.config.server.request_timeout_s) as w:
            try:
                return view(*args)
            finally:
                if w.reason == DISCONNECTED:
                    state.metrics.disconnect()
    return run


@watched
def invocations() -> Response:
    state = _state()
    service = state.require()
    headers = request.headers
    session_id = headers.get(SESSION_HEADER)
    if session_id is not None:  # SageMaker stateful sessions (serve/session_route.py)
        with adapters.selected(state.adapters, headers):
            return session_route.invocation(
                session_id, state.sessions, state.link, service.engine,
                lambda body: service.invoke(body, headers.get("Content-Type"), headers.get("Accept")), _respond,
                state.metrics.session_forwards.inc)
    body = request.get_data(cache=False)
    with adapters.selected(state.adapters, headers):
        out, content_type = service.invoke(body, headers.get("Content-Type"), headers.get("Accept"))
    return _respond(out, content_type)


@watched
def openai_route(kind: str) -> Response:
    state = _state()
    service = state.require()
    media = media_type(request.headers.get("Content-Type"))
    if media not in JSON_TYPES:
        raise ProtocolError(415, f"unsupported content type {media!r}: use application/json",
                            "unsupported_media_type")
    req = kinds.parse_request(decode_json(request.get_data(cache=False)), state.limits, kind)
    ctx = Ctx(service.engine, state.model_name, state.metrics)
    with adapters.selected(state.adapters, request.headers):
        if req.stream:
            return _respond(stream(ctx, req), "text/event-stream", openai=True)
        return _respond(enc.json_body(start(ctx, req).finish()), "application/json")


def models() -> dict:
    state = _state()
    base = {"id": state.model_name, "object": "model", "created": 0, "owned_by": "granite-h-sagemaker"}
    extra = [{"id": a["name"], "object": "model", "created": a["created"], "owned_by": "granite-h-sagemaker",
              "parent": state.model_name, "root": a["src"]} for a in _adapter_list(state)]
    return {"object": "list", "data": [base, *extra]}


# ---- LoRA adapters (the SageMaker inference-component contract) ----

def _adapter_list(state: ServerState) -> list[dict]:
    return state.adapters.list(state.engine) if state.live() else []


def register_adapter() -> Response:
    state = _state()
    service = state.require()
    raw = request.get_data(cache=False)
    if raw.strip():
        obj = decode_json(raw)
        if not isinstance(obj, dict):
            raise ProtocolError(400, "the body must be a JSON object {\"name\", \"src\", \"preload\"}", "invalid_request")
    else:  # the contract also sends them as query parameters
        obj = request.args.to_dict()
    info = state.adapters.register(service.engine, obj.get("name"), obj.get("src"))
    return Response(enc.json_body({"message": f"Adapter {info['name']} registered", "adapter": info}),
                    status=200, mimetype="application/json")


def unregister_adapter(name: str) -> Response:
    state = _state()
    service = state.require()
    state.adapters.unregister(service.engine, name)
    return Response(enc.json_body({"message": f"Adapter {name} unregistered"}), status=200,
                    mimetype="application/json")


def list_adapters() -> dict:
    state = _state()
    service = state.require()
    listed = _adapter_list(state)
    return {"adapters": listed, "memory": service.engine.stats().get("adapters", {})}


def execution_parameters() -> dict:
    state = _state()
    s, slots = state.config.server, state.config.engine.max_concurrent_seqs
    if state.live():
        slots = state.engine.stats().get("total_slots", slots)
    return {"MaxConcurrentTransforms": s.max_concurrent_transforms or s.workers * slots,
            "BatchStrategy": s.batch_strategy, "MaxPayloadInMB": s.max_payload_bytes // (1024 * 1024)}


def metrics() -> Response:
    state = _state()
    stats = state.engine.stats() if state.live() else {"ready": False}
    return Response(state.metrics.render(stats), content_type=METRICS_CONTENT_TYPE)


# ---- errors and every request ----

def http_error(e: HTTPException) -> Response:
    kind = {413: "payload_too_large", 404: "not_found", 405: "method_not_allowed"}.get(e.code, "http_error")
    limit = _state().config.server.max_payload_bytes
    message = f"body larger than {limit} bytes" if e.code == 413 else e.description
    return _error(RequestError(message or kind, e.code or 500, kind))


def internal_error(e: Exception) -> Response:
    log.exception("request failed")
    return _error(e)


def remember_route() -> None:
    g.route = request.url_rule.rule if request.url_rule is not None else "other"


def finish(response: Response) -> Response:
    attrs = request.headers.get(CUSTOM_ATTRIBUTES)
    if attrs is not None:
        response.headers[CUSTOM_ATTRIBUTES] = attrs
    state = _state()
    state.metrics.request(getattr(g, "route", "other"), response.status_code)
    _drain_unread_body(response, max(DRAIN_MIN_BYTES, 2 * state.config.server.max_payload_bytes))
    return response


def register(app: Flask) -> None:
    """Every route, error handler and per-request hook, on `app`."""
    app.get("/ping")(ping)
    app.post("/invocations")(invocations)
    for k in kinds.KINDS:
        if k.route is not None:
            app.post(f"/v1/{k.route}", endpoint=k.name)(functools.partial(openai_route, k.name))
    app.get("/v1/models")(models)
    app.post("/adapters")(register_adapter)
    app.delete("/adapters/<name>")(unregister_adapter)
    app.get("/adapters")(list_adapters)
    app.get("/execution-parameters")(execution_parameters)
    app.get("/metrics")(metrics)
    app.register_error_handler(RequestError, _error)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, internal_error)
    app.before_request(remember_route)
    app.after_request(finish)
