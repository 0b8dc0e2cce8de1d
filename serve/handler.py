"""/invocations handling: default input -> predict -> output, or the model's code/inference.py overrides.

SageMaker inference-toolkit semantics: `<model_dir>/code/inference.py` may define `model_fn(model_dir)`,
`input_fn(body, content_type)`, `predict_fn(data, model)`, `output_fn(prediction, accept)` or
`transform_fn(model, body, content_type, accept)`; each one found replaces the default. The default
model_fn returns the engine. JSON Lines bodies and batch records go through `handle_record`, which
never raises.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from model.types import QueueFull, RequestError
from serve import encoders as enc
from serve import watch
from serve.engine_client import EngineClient
from serve.generate import Pending, raise_if_abandoned, start, stream
from serve.kinds import is_request, parse_request
from serve.prompts import Ctx
from serve.protocol import (
    JSON_TYPES,
    JSONL_TYPES,
    Limits,
    ProtocolError,
    decode_json,
    media_type,
    split_lines,
    tgi_params,
)

log = logging.getLogger(__name__)
HOOKS = ("model_fn", "input_fn", "predict_fn", "output_fn", "transform_fn")
# The one back-pressure policy: a record (a JSON Lines line, a batch record) whose request has no work of its
# own in flight waits up to this long for queue room, then its line says 429; a request that is abandoned
# (serve/watch.py: hang-up or REQUEST_TIMEOUT) stops waiting at once. Nothing above or below retries.
QUEUE_WAIT_S = 600.0


class Stream:
    """A prediction that is an SSE body (generator of bytes)."""

    def __init__(self, body: Iterator[bytes]) -> None:
        self.body = body


class JsonLines(list):
    """Raw lines of an application/jsonlines body (input), or response objects (prediction)."""


def load_user_module(model_dir: str | Path) -> ModuleType | None:
    path = Path(model_dir) / "code" / "inference.py"
    if not path.is_file():
        return None
    if (path.parent / "requirements.txt").is_file():
        log.warning("%s/requirements.txt is not installed by this container (it starts offline); "
                    "bake extra packages into the image", path.parent)
    code_dir = str(path.parent)
    if code_dir not in sys.path:
        sys.path.insert(0, code_dir)  # so inference.py can import its neighbours
    spec = importlib.util.spec_from_file_location("sagemaker_user_inference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    log.info("custom handler %s overrides: %s", path, ", ".join(h for h in HOOKS if hasattr(module, h)) or "nothing")
    return module


def error_record(e: BaseException) -> dict:
    """A record's error line: the error body plus its status."""
    if not isinstance(e, RequestError):
        log.exception("record failed", exc_info=e)
    status, body = enc.error_of(e)
    return {**body, "status": status}


# ---- records (JSON Lines, batch) ----

def _limits(engine: EngineClient, defaults: dict | None, limits: Limits | None) -> Limits:
    base = limits or Limits.from_config(engine.config)
    if defaults:
        values, _ = tgi_params(defaults, base)
        base = base.with_base(values)
    return base


def _start_record(ctx: Ctx, line: bytes | str, limits: Limits) -> Pending:
    req = parse_request(decode_json(line), limits)
    return start(ctx, req, record=True)


def handle_records(engine: EngineClient, lines: list, defaults: dict | None = None, *, limits: Limits | None = None,
                   metrics=None) -> list[dict]:
    """Records -> one response object per record, in order; all run on the engine concurrently
    (submitted as queue room allows). Never raises: a bad record gets an error object."""
    ctx = Ctx(engine, engine.model_name, metrics)
    try:
        lim = _limits(engine, defaults, limits)
    except ProtocolError as e:
        return [error_record(e) for _ in lines]
    out: list[Any] = [None] * len(lines)
    inflight: deque[tuple[int, Pending]] = deque()

    def finish_oldest() -> None:
        j, p = inflight.popleft()
        try:
            out[j] = enc.reproducible(p.finish())
        except Exception as e:
            out[j] = error_record(e)

    w = watch.current()
    for i, line in enumerate(lines):
        deadline = time.monotonic() + QUEUE_WAIT_S
        while out[i] is None:
            if w is not None and w.reason is not None:  # abandoned: submit no more records
                out[i] = error_record(_abandoned(w))
                break
            try:
                inflight.append((i, _start_record(ctx, line, lim)))
                break
            except QueueFull as e:  # wait for room: finish our own oldest record, or back off
                if inflight:
                    finish_oldest()
                elif time.monotonic() > deadline:
                    out[i] = error_record(e)
                else:
                    time.sleep(0.05)
            except Exception as e:
                out[i] = error_record(e)
    while inflight:
        finish_oldest()
    return out


def _abandoned(w: watch.Watch) -> Exception:
    try:
        raise_if_abandoned()
    except Exception as e:
        return e
    return RuntimeError(w.reason)


def handle_record(engine: EngineClient, record: str, defaults: dict | None = None) -> dict:
    """One JSON Lines record (`{"inputs":...}`, `{"messages":...}`, `{"prompt":...}` or a bare JSON string)
    -> its response object, or {"error", "error_type", "status"}. Never raises."""
    try:
        return handle_records(engine, [record], defaults)[0]
    except Exception as e:  # belt and braces: the contract is "never raises"
        return error_record(e)


# ---- the defaults (a user's inference.py may import and delegate to these) ----

def default_input_fn(body: bytes, content_type: str | None) -> Any:
    media = media_type(content_type)
    if media in JSONL_TYPES:
        return JsonLines(split_lines(body))
    if media not in JSON_TYPES:
        raise ProtocolError(415, f"unsupported content type {media!r}: use application/json or "
                                 "application/jsonlines", "unsupported_media_type")
    return decode_json(body)


def default_output_fn(prediction: Any, accept: str | None) -> tuple[Any, str]:
    if isinstance(prediction, Stream):
        return prediction.body, "text/event-stream"
    if isinstance(prediction, JsonLines):
        return enc.jsonl_body(prediction), "application/jsonlines"
    if isinstance(prediction, (bytes, str)):
        return prediction, _accept_or_json(accept)
    return enc.json_body(prediction), "application/json"


def _accept_or_json(accept: str | None) -> str:
    return accept if accept and "*" not in accept and "," not in accept else "application/json"


class Service:
    def __init__(self, engine: EngineClient, model_dir: str | Path, limits: Limits, metrics=None,
                 user: ModuleType | None = None) -> None:
        self.engine = engine
        self.model_dir = str(model_dir)
        self.limits = limits
        self.metrics = metrics
        self.user = user
        self.model: Any = None  # what model_fn returned (by default the engine): the user's to shape

    def hook(self, name: str):
        fn = getattr(self.user, name, None) if self.user is not None else None
        return fn if callable(fn) else None

    def load_model(self) -> None:
        """Run model_fn once the engine is ready (the server's loader thread calls this)."""
        fn = self.hook("model_fn")
        self.model = fn(self.model_dir) if fn else self.engine

    def predict_fn(self, data: Any, model: Any) -> Any:
        engine = model if isinstance(model, EngineClient) else self.engine  # model_fn may return something else
        if isinstance(data, JsonLines):
            out = JsonLines(handle_records(engine, data, limits=self.limits, metrics=self.metrics))
            raise_if_abandoned()  # every record was cancelled; the request as a whole answers the error
            return out
        req = data if is_request(data) else parse_request(data, self.limits)
        ctx = Ctx(engine, engine.model_name, self.metrics)
        if req.stream:
            return Stream(stream(ctx, req))
        return start(ctx, req).finish()

    def invoke(self, body: bytes, content_type: str | None, accept: str | None) -> tuple[Any, str]:
        """-> (bytes | str | iterator of bytes, response content type)."""
        transform = self.hook("transform_fn")
        if transform is not None:
            return self._as_response(transform(self.model, body, content_type, accept), accept)
        data = (self.hook("input_fn") or default_input_fn)(body, content_type)
        prediction = (self.hook("predict_fn") or self.predict_fn)(data, self.model)
        return self._as_response((self.hook("output_fn") or default_output_fn)(prediction, accept), accept)

    def _as_response(self, result: Any, accept: str | None) -> tuple[Any, str]:
        # User hooks may return (body, content_type) or just a body (then Accept, else JSON, is its type).
        body, ctype = result if isinstance(result, tuple) and len(result) == 2 else default_output_fn(result, accept)
        if isinstance(body, (bytes, str, Iterator)):
            return body, str(ctype)
        return enc.json_body(body), str(ctype)
