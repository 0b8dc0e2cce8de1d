"""Run parsed requests on the engine: tokenize, submit, then collect (JSON) or stream (SSE).

`start(ctx, request)` submits everything a request needs at once and returns a Pending whose
`finish()` collects the response object, so many requests (JSON Lines records) can share the engine
concurrently. `stream(ctx, request)` submits first (errors become a proper HTTP status before any byte
is sent) and returns a generator; closing it (client gone: GeneratorExit) cancels the handle.
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
    EngineNotReady,
    FailureKind,
    FinishReason,
    GenerationRequest,
    QueueFull,
    RequestError,
    SamplingParams,
)
from serve import encoders as enc
from serve import watch
from serve.engine_client import EngineClient, PromptTokenizer
from serve.metrics import Metrics
from serve.protocol import ChatRequest, CompletionRequest, ProtocolError, TextRequest
from serve.protocol.toolcalls import ToolCallHoldback
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


@dataclass
class Ctx:
    engine: EngineClient
    model_name: str
    metrics: Metrics | None = None


@dataclass
class Pending:
    items: list  # per prompt: its Handle, or its Completion if it was collected early (queue room)
    finish_fn: Callable[[list[Completion]], Any]
    ctx: Ctx

    def finish(self) -> Any:
        try:
            return self.finish_fn([x if isinstance(x, Completion) else collect(self.ctx, x) for x in self.items])
        finally:
            cancel_all(self.items)  # no-op for finished handles; frees slots if collecting failed


_SUBMITTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # handle -> submit time (for TTFT)


def cancel_all(items: list) -> None:
    for x in items:
        if not isinstance(x, Completion):
            x.cancel()


def timed(ctx: Ctx, handle) -> Iterator:
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


def collect(ctx: Ctx, handle) -> Completion:
    for _ in timed(ctx, handle):
        pass
    c = handle.result()
    if c.finish_reason == FinishReason.CANCELLED:
        raise_if_abandoned()
    if c.finish_reason == FinishReason.ERROR:
        raise GenerationFailed(c.error or "generation failed", c.failure)
    return c


def _ready_tokenizer(ctx: Ctx) -> PromptTokenizer:
    tokenizer = ctx.engine.tokenizer
    if not ctx.engine.ready or tokenizer is None:
        raise EngineNotReady(ctx.engine.error or "the model is not ready")
    return tokenizer


def encode_prompt(ctx: Ctx, text: str, truncate: int | None = None, continued: bool = True) -> tuple[int, ...]:
    """Token ids of a prompt; inside a session (`continued`) they continue the session's conversation."""
    tokenizer = _ready_tokenizer(ctx)
    try:
        ids = tokenizer.encode(text)
    except Exception as e:  # input the tokenizer cannot take is the client's problem, not a 500
        raise ProtocolError(422, f"the prompt cannot be tokenized: {type(e).__name__}") from None
    ids = tuple(ids[-truncate:] if truncate else ids)
    turn = current_turn()
    return turn.continue_ids(ids) if turn is not None and continued else ids


def chat_prompt(ctx: Ctx, req: ChatRequest) -> tuple[int, ...]:
    """Token ids of the rendered conversation (inside a session: its messages, then these)."""
    tokenizer = _ready_tokenizer(ctx)
    messages = [dict(m) for m in req.messages]
    turn = current_turn()
    if turn is not None:
        messages = turn.chat_messages(messages)
    try:
        text = tokenizer.render_chat(
            messages, tools=[dict(t) for t in req.tools] if req.tools else None,
            documents=[dict(d) for d in req.documents] if req.documents else None)
    except Exception as e:  # the template rejects this conversation (jinja raise_exception, bad shapes)
        raise ProtocolError(422, f"the chat template cannot render these messages: {e}"[:300]) from None
    return encode_prompt(ctx, text, continued=False)


def submit_all(ctx: Ctx, prompts: list[tuple[int, ...]], params: SamplingParams, watched: bool = True) -> list:
    """Submit every prompt of one request (`watched`: cancelled with the request, see serve/watch.py).
    When the queue is full and some of this request's own prompts are in flight, wait for the oldest of them (which admits the next waiting sequence) and
    retry, so a long list of inputs is not refused because of itself; QueueFull only when the
    queue is full of other requests' work."""
    items: list = []
    oldest = 0
    w = watch.current() if watched else None
    turn = current_turn()
    try:
        for ids in prompts:
            request = GenerationRequest(ids, params, uuid.uuid4().hex,
                                        session_id=turn.session.id if turn is not None else None)
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


def _ids(prefix: str) -> tuple[str, int]:
    return f"{prefix}-{uuid.uuid4().hex}", int(time.time())


# ---- non-streaming ----

def start(ctx: Ctx, req: Any, record: bool = False) -> Pending:
    """record=True (JSON Lines): a single TGI input answers with an object instead of a list."""
    name = ctx.model_name
    if isinstance(req, TextRequest):
        items = submit_all(ctx, [encode_prompt(ctx, t, req.truncate) for t in req.inputs], req.params)

        def finish_tgi(cs: list[Completion]) -> Any:
            items = [enc.tgi_item(p, c, req.details, req.return_full_text, req.params.top_n_tokens)
                     for p, c in zip(req.inputs, cs, strict=True)]
            return items[0] if record and not req.batched else items

        return Pending(items, finish_tgi, ctx)
    if isinstance(req, ChatRequest):
        items = submit_all(ctx, [chat_prompt(ctx, req)], req.params)

        def finish_chat(cs: list[Completion]) -> Any:
            rid, created = _ids("chatcmpl")
            return enc.chat_completion(rid, name, created, cs[0], bool(req.tools), req.logprobs)

        return Pending(items, finish_chat, ctx)
    if isinstance(req, CompletionRequest):
        items = submit_all(ctx, [encode_prompt(ctx, p) for p in req.prompts], req.params)

        def finish_completion(cs: list[Completion]) -> Any:
            rid, created = _ids("cmpl")
            choices = [enc.completion_choice(i, p, c, req.echo, req.logprobs)
                       for i, (p, c) in enumerate(zip(req.prompts, cs, strict=True))]
            return enc.text_completion(rid, name, created, choices, sum(c.prompt_tokens for c in cs),
                                       sum(c.generated_tokens for c in cs),
                                       cached_tokens=sum(c.cached_tokens for c in cs))

        return Pending(items, finish_completion, ctx)
    raise TypeError(f"not a request: {type(req).__name__}")


# ---- streaming ----

def stream(ctx: Ctx, req: Any) -> Iterator[bytes]:
    if isinstance(req, TextRequest):
        (handle,) = submit_all(ctx, [encode_prompt(ctx, req.inputs[0], req.truncate)], req.params, watched=False)
        body = _tgi_stream(ctx, req, handle)
    elif isinstance(req, ChatRequest):
        (handle,) = submit_all(ctx, [chat_prompt(ctx, req)], req.params, watched=False)
        body = _chat_stream(ctx, req, handle)
    elif isinstance(req, CompletionRequest):
        (handle,) = submit_all(ctx, [encode_prompt(ctx, req.prompts[0])], req.params, watched=False)
        body = _completion_stream(ctx, req, handle)
    else:
        raise TypeError(f"not a request: {type(req).__name__}")
    return _guarded(ctx, handle, body)


def _guarded(ctx: Ctx, handle, body: Iterator[bytes]) -> Iterator[bytes]:
    finished = False
    try:
        yield from body
        finished = True
    finally:
        if not finished and ctx.metrics is not None and not handle.finished:
            ctx.metrics.disconnect()
        handle.cancel()  # client went away (GeneratorExit): free the slot at the next step


def _openai_abort(ev) -> Iterator[bytes]:
    # A sequence that ended without a token: failed -> an error event and [DONE]; cancelled -> nothing
    # (its client is gone).
    if ev.finish_reason != FinishReason.CANCELLED:
        yield _error_event(ev, openai=True)
        yield enc.DONE


def _error_event(ev, openai: bool) -> bytes:
    _, body = enc.error_of(GenerationFailed(ev.error or f"generation ended: {ev.finish_reason.value}", ev.failure))
    return enc.sse(body, openai=openai)


def _tgi_stream(ctx: Ctx, req: TextRequest, handle) -> Iterator[bytes]:
    text, index = req.inputs[0] if req.return_full_text else "", 0
    for ev in timed(ctx, handle):
        if ev.token_id < 0:  # a failed or cancelled sequence ends without a token
            if ev.finish_reason != FinishReason.CANCELLED:
                yield _error_event(ev, openai=False)
            return
        text += ev.text
        final = (text, handle.result()) if ev.finish_reason is not None else None
        yield enc.tgi_event(index, ev, final, req.params.top_n_tokens)
        index += 1


def _chat_stream(ctx: Ctx, req: ChatRequest, handle) -> Iterator[bytes]:
    rid, created = _ids("chatcmpl")
    name = ctx.model_name
    hold = ToolCallHoldback() if req.tools else None
    yield enc.chat_chunk(rid, name, created, {"role": "assistant", "content": ""})
    n = 0
    for ev in timed(ctx, handle):
        if ev.token_id < 0:
            yield from _openai_abort(ev)
            return
        n += 1
        text = hold.push(ev.text) if hold else ev.text
        lp = enc.chat_logprobs([ev.text], [ev.logprob], [ev.top_tokens]) if req.logprobs else None
        if text or lp:
            yield enc.chat_chunk(rid, name, created, {"content": text}, logprobs=lp)
        if ev.finish_reason is None:
            continue
        content, calls = hold.finish() if hold else ("", [])
        if content:
            yield enc.chat_chunk(rid, name, created, {"content": content})
        if calls:
            yield enc.chat_chunk(rid, name, created, {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]})
        yield enc.chat_chunk(rid, name, created, {}, enc.openai_finish(ev.finish_reason, bool(calls)))
        if req.include_usage:
            yield enc.usage_chunk(rid, name, created, handle.prompt_tokens, n, handle.cached_tokens)
        yield enc.DONE


def _completion_stream(ctx: Ctx, req: CompletionRequest, handle) -> Iterator[bytes]:
    rid, created = _ids("cmpl")
    name = ctx.model_name

    def chunk(text: str, finish: str | None = None, lp: dict | None = None) -> bytes:
        choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
        return enc.sse(enc.text_completion(rid, name, created, [choice], 0, 0, chunk=True), openai=True)

    if req.echo:
        yield chunk(req.prompts[0])
    n = 0
    for ev in timed(ctx, handle):
        if ev.token_id < 0:
            yield from _openai_abort(ev)
            return
        n += 1
        lp = None
        if req.logprobs is not None:
            lp = {"tokens": [ev.text], "token_logprobs": [enc._lp(ev.logprob)],
                  "top_logprobs": [{t.text: enc._lp(t.logprob) for t in ev.top_tokens}] if req.logprobs else None}
        finish = enc.openai_finish(ev.finish_reason) if ev.finish_reason is not None else None
        yield chunk(ev.text, finish, lp)
        if finish is not None:
            if req.include_usage:
                obj = enc.text_completion(rid, name, created, [], handle.prompt_tokens, n,
                                          cached_tokens=handle.cached_tokens)
                yield enc.sse(obj, openai=True)
            yield enc.DONE
