"""OpenAI chat completions: `{"messages", "tools", "documents", sampling fields, "stream"}` on /invocations
and /v1/chat/completions.

One sequence: the conversation through the checkpoint's chat template. Granite `<tool_call>` output comes back
parsed in `tool_calls` when the request may call tools; streamed, the markup never shows as content: each call
is sent as OpenAI tool_calls deltas (its name, then its arguments piece by piece as they are generated), by
the same parser as the non-streamed answer (serve/protocol/toolcalls.py).
"""

from __future__ import annotations

from collections.abc import Iterator

from model.types import Completion, TokenEvent
from serve import encoders as enc
from serve.engine_client import RequestHandle
from serve.kinds.kind import Kind
from serve.prompts import Ctx, chat_prompt, response_id
from serve.protocol.openai import ChatRequest, may_sample, parse_chat
from serve.protocol.toolcalls import ToolCallParser


def prompts(ctx: Ctx, req: ChatRequest) -> Iterator[tuple[int, ...]]:
    yield chat_prompt(ctx, req)


def respond(ctx: Ctx, req: ChatRequest, cs: list[Completion], record: bool) -> dict:
    rid, created = response_id("chatcmpl")
    return enc.chat_completion(rid, ctx.model_name, created, cs[0], req.calls, req.logprobs)


class Stream:
    openai = True

    def __init__(self, ctx: Ctx, req: ChatRequest, handle: RequestHandle) -> None:
        self.rid, self.created = response_id("chatcmpl")
        self.name, self.req, self.handle = ctx.model_name, req, handle
        self.parser = ToolCallParser() if req.calls else None

    def _chunk(self, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> bytes:
        return enc.chat_chunk(self.rid, self.name, self.created, delta, finish, logprobs=logprobs)

    def head(self) -> Iterator[bytes]:
        yield self._chunk({"role": "assistant", "content": ""})

    def token(self, ev: TokenEvent, n: int) -> Iterator[bytes]:
        p = self.parser
        deltas = p.push(ev.text) if p else ([{"content": ev.text}] if ev.text else [])
        if ev.finish_reason is not None and p:
            deltas += p.finish()
        lp = enc.chat_logprobs([ev.text], [ev.logprob], [ev.top_tokens]) if self.req.logprobs else None
        if lp and not deltas:
            deltas = [{"content": ""}]
        for i, delta in enumerate(deltas):
            yield self._chunk(delta, logprobs=lp if i == 0 else None)
        if ev.finish_reason is None:
            return
        yield self._chunk({}, enc.openai_finish(ev.finish_reason, bool(p and p.calls and p.complete)))
        if self.req.include_usage:
            h = self.handle
            yield enc.usage_chunk(self.rid, self.name, self.created, h.prompt_tokens, n, h.cached_tokens)
        yield enc.DONE


KIND = Kind("chat", "messages", "chat/completions", ChatRequest, parse_chat, prompts, respond, Stream, may_sample)
