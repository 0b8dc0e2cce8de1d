"""Run parsed requests on the engine: submit, then collect (JSON) or stream (SSE), for any request kind.

`start(ctx, request)` submits everything a request needs at once and returns a Pending whose
`finish()` collects the response object, so many requests (JSON Lines records) can share the engine
concurrently. `stream(ctx, request)` submits first (errors become a proper HTTP status before any byte
is sent) and returns a generator; closing it (client gone: GeneratorExit) cancels the handle. What
differs between request kinds (prompts, response, stream events) is asked of the kind's row in
serve/kinds; this module never asks which kind a request is.
"""

from __future__ import annotations

import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from model.types import (
    Completion,
    FailureKind,
    FinishReason,
    GenerationRequest,
    QueueFull,
    RequestError,
    SamplingParams,
    TokenEvent,
)
from serve import adapters, watch
from serve import encoders as enc
from serve.engine_client import RequestHandle
from serve.kinds import Request, kind_of
from serve.prompts import Ctx
from serve.sessions import current_turn

FAILURE_STATUS = {FailureKind.OUT_OF_MEMORY: 507, FailureKind.SHUTDOWN: 503, FailureKind.STEP_FAILED: 500}


class GenerationFailed(RequestError):
    """A sequence ended with FinishReason.ERROR; the engine's failure kind decides the status."""

    error_type = "generation_error"

    def __init__(self, message: str, failure: FailureKind | None) -> None:
        super().__init__(message, FAILURE_STATUS.get(failure, 500))


class RequestAbandoned(RequestError):
    """The request's client hung up, or its deadline passed: its sequences were cancelled."""

    def __init__(self, w: watch.Watch) -> None:
        if w.reason == watch.DEADLINE:
            super().__init__(f"the request ran longer than the server's deadline ({w.timeout_s:g} s, "
                             "REQUEST_TIMEOUT); its generation was stopped")
            self.status, self.error_type = 504, "timeout"
        else:
            super().__init__("the client closed the connection; its generation was stopped")
            self.status, self.error_type = 499, "client_closed"


def raise_if_abandoned() -> None:
    w = watch.current()
    if w is not None and w.reason is not None:
        raise RequestAbandoned(w)


Item = RequestHandle | Completion  # a submitted sequence, or its Completion once collected


@dataclass
class Pending:
    items: list[Item]  # per prompt: its handle, or its Completion if it was collected early (queue room)
    finish_fn: Callable[[list[Completion]], Any]
    ctx: Ctx

    def finish(self) -> Any:
        try:
            return self.finish_fn([x if isinstance(x, Completion) else collect(self.ctx, x) for x in self.items])
        finally:
            cancel_all(self.items)  # no-op for finished handles; frees slots if collecting failed


_SUBMITTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # handle -> submit time (for TTFT)


def cancel_all(items: list[Item]) -> None:
    for x in items:
        if not isinstance(x, Completion):
            x.cancel()


def timed(ctx: Ctx, handle: RequestHandle) -> Iterator[TokenEvent]:
    """Iterate a handle's events, recording time to first token and time per output token."""
    t0, first, n, last = _SUBMITTED.get(handle, time.monotonic()), None, 0, None
    for ev in handle:
        last = time.monotonic()
        if ev.token_id >= 0:
            n += 1
            first = last if first is None else first
        yield ev
    if ctx.metrics is not None and first is not None:
        tpot = (last - first) / (n - 1) if n > 1 else None
        ctx.metrics.timing(first - t0, tpot)


def collect(ctx: Ctx, handle: RequestHandle) -> Completion:
    for _ in timed(ctx, handle):
        pass
    c = handle.result()
    if c.finish_reason == FinishReason.CANCELLED:
        raise_if_abandoned()
    if c.finish_reason == FinishReason.ERROR:
        raise GenerationFailed(c.error or "generation failed", c.failure)
    return c


def submit_all(ctx: Ctx, prompts: list[tuple[int, ...]], params: SamplingParams, watched: bool = True,
               adapter: str | None = None) -> list[Item]:
    """Submit every prompt of one request (`watched`: cancelled with the request, see serve/watch.py).
    When the queue is full and some of this request's own prompts are in flight, wait for the oldest of them (which admits the next waiting sequence) and
    retry, so a long list of inputs is not refused because of itself; QueueFull only when the
    queue is full of other requests' work."""
    items: list[Item] = []
    oldest = 0
    w = watch.current() if watched else None
    turn = current_turn()
    try:
        for ids in prompts:
            request = GenerationRequest(ids, params, uuid.uuid4().hex,
                                        session_id=turn.session.id if turn is not None else None, adapter=adapter)
            while True:
                try:
                    handle = ctx.engine.submit(request)
                    if turn is not None:
                        turn.submitted(handle, ids)
                    _SUBMITTED[handle] = time.monotonic()
                    if w is not None:
                        w.add(handle)
                    items.append(handle)
                    break
                except QueueFull:
                    while oldest < len(items) and isinstance(items[oldest], Completion):
                        oldest += 1
                    if oldest == len(items):
                        raise
                    items[oldest] = collect(ctx, items[oldest])
    except BaseException:
        cancel_all(items)
        raise
    return items


# ---- non-streaming ----

def start(ctx: Ctx, req: Request, record: bool = False) -> Pending:
    """record=True (JSON Lines): a single TGI input answers with an object instead of a list."""
    kind = kind_of(req)
    adapter = adapters.choose(ctx.engine, req)
    items = submit_all(ctx, list(kind.prompts(ctx, req)), req.params, adapter=adapter)
    return Pending(items, lambda cs: kind.respond(ctx, req, cs, record), ctx)


# ---- streaming ----

def stream(ctx: Ctx, req: Request) -> Iterator[bytes]:
    adapter = adapters.choose(ctx.engine, req)
    (handle,) = submit_all(ctx, [next(kind_of(req).prompts(ctx, req))], req.params, watched=False, adapter=adapter)
    return _guarded(ctx, handle, stream_body(ctx, req, handle))


def stream_body(ctx: Ctx, req: Request, handle: RequestHandle) -> Iterator[bytes]:
    """The one stream loop: the kind's encoder frames each token. A sequence that fails ends the stream with
    an error event ([DONE] after it on OpenAI streams); a cancelled one just ends (its client is gone)."""
    encoder = kind_of(req).stream(ctx, req, handle)
    yield from encoder.head()
    n = 0
    for ev in timed(ctx, handle):
        if ev.token_id < 0:  # a failed or cancelled sequence ends without a token
            if ev.finish_reason != FinishReason.CANCELLED:
                yield _error_event(ev, encoder.openai)
                if encoder.openai:
                    yield enc.DONE
            return
        n += 1
        yield from encoder.token(ev, n)


def _guarded(ctx: Ctx, handle: RequestHandle, body: Iterator[bytes]) -> Iterator[bytes]:
    finished = False
    try:
        yield from body
        finished = True
    finally:
        if not finished and ctx.metrics is not None and not handle.finished:
            ctx.metrics.disconnect()
        handle.cancel()  # client went away (GeneratorExit): free the slot at the next step


def _error_event(ev: TokenEvent, openai: bool) -> bytes:
    _, body = enc.error_of(GenerationFailed(ev.error or f"generation ended: {ev.finish_reason.value}", ev.failure))
    return enc.sse(body, openai=openai)
