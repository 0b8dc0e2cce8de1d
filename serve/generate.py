"""Run parsed requests on the engine: submit, then collect (JSON) or stream (SSE), for any request kind.

Each prompt runs as `best_of` rows forked from one prefill (engine.submit_n; one row: engine.submit).
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
    Constraint,
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
from serve.sessions import SessionError, current_turn

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
               rows: int = 1, constraint: Constraint | None = None, adapter: str | None = None) -> list[Item]:
    """Submit every prompt of one request, `rows` forked rows each (items: rows per prompt, in prompt order;
    `watched`: cancelled with the request, see serve/watch.py); `constraint`: every row's output matches it;
    `adapter`: the LoRA adapter they run on (None: the base).
    When the queue is full and some of this request's own prompts are in flight, wait for the oldest of them (which admits the next waiting sequence) and
    retry, so a long list of inputs is not refused because of itself; QueueFull only when the
    queue is full of other requests' work."""
    items: list[Item] = []
    oldest = 0
    w = watch.current() if watched else None
    turn = current_turn()
    if turn is not None and not turn.fork and rows > 1:
        raise SessionError(400, f"a turn of session {turn.session.id} is one answer: n / best_of > 1 inside a "
                                'session needs "fork": true', "invalid_session_request")
    own = turn is not None and not turn.fork  # a fork runs from the session's state without advancing it
    try:
        for ids in prompts:
            request = GenerationRequest(tuple(ids), params, uuid.uuid4().hex,
                                        session_id=turn.session.id if own else None,
                                        snapshot_at=getattr(ids, "snapshot_at", None),  # serve/prompts.py PromptIds
                                        constraint=constraint, adapter=adapter)
            while True:
                try:
                    handles = [ctx.engine.submit(request)] if rows == 1 else ctx.engine.submit_n(request, rows)
                    if own:
                        turn.submitted(handles[0], ids)
                    for handle in handles:
                        _SUBMITTED[handle] = time.monotonic()
                        if w is not None:
                            w.add(handle)
                    items.extend(handles)
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
    items = submit_all(ctx, list(kind.prompts(ctx, req)), req.params, rows=max(req.n, req.best_of),
                       constraint=req.constraint, adapter=adapter)
    return Pending(items, lambda cs: kind.respond(ctx, req, cs, record), ctx)


# ---- streaming ----

def stream(ctx: Ctx, req: Request) -> Iterator[bytes]:
    adapter = adapters.choose(ctx.engine, req)
    handles = submit_all(ctx, [next(kind_of(req).prompts(ctx, req))], req.params, watched=False, rows=req.n,
                         constraint=req.constraint, adapter=adapter)
    return _guarded(ctx, handles, stream_body(ctx, req, handles))


def stream_body(ctx: Ctx, req: Request, handles: list[RequestHandle]) -> Iterator[bytes]:
    """The one stream loop: the kind's encoder frames each token of each row (rows in turn: they advance in the
    same engine steps). A row that fails ends the stream with an error event ([DONE] after it on OpenAI
    streams); a cancelled one just ends it (its client is gone)."""
    encoder = kind_of(req).stream(ctx, req, handles)
    yield from encoder.head()
    events = [timed(ctx, h) for h in handles]
    counts = [0] * len(handles)
    live = list(range(len(handles)))
    while live:
        for i in list(live):
            ev = next(events[i])
            if ev.token_id < 0:  # a failed or cancelled sequence ends without a token
                if ev.finish_reason != FinishReason.CANCELLED:
                    yield _error_event(ev, encoder.openai)
                    if encoder.openai:
                        yield enc.DONE
                return
            counts[i] += 1
            yield from encoder.token(ev, counts[i], i)
            if ev.finish_reason is not None:
                live.remove(i)
                next(events[i], None)  # the row's events are over: timed() records its timings
    yield from encoder.tail(sum(counts))


def _guarded(ctx: Ctx, handles: list[RequestHandle], body: Iterator[bytes]) -> Iterator[bytes]:
    finished = False
    try:
        yield from body
        finished = True
    finally:
        if not finished and ctx.metrics is not None and not all(h.finished for h in handles):
            ctx.metrics.disconnect()
        for h in handles:
            h.cancel()  # client went away (GeneratorExit): free the slots at the next step


def _error_event(ev: TokenEvent, openai: bool) -> bytes:
    _, body = enc.error_of(GenerationFailed(ev.error or f"generation ended: {ev.finish_reason.value}", ev.failure))
    return enc.sse(body, openai=openai)
