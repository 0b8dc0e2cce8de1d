"""OpenAI completions: `{"prompt": str | [str], sampling fields, "echo", "logprobs", "stream"}` on
/invocations and /v1/completions.

One prompt: `best_of` rows forked from its one prefill, `n` choices (the best by cumulative logprob when best_of
> n); choices in prompt order, index = prompt * n + row; `echo` puts the prompt before its text.
"""

from __future__ import annotations

from collections.abc import Iterator

from model.types import Completion, TokenEvent
from serve import encoders as enc
from serve.engine_client import RequestHandle
from serve.kinds.kind import Kind, best_rows
from serve.prompts import Ctx, encode_prompt, response_id
from serve.protocol.openai import CompletionRequest, may_sample, parse_completion


def prompts(ctx: Ctx, req: CompletionRequest) -> Iterator[tuple[int, ...]]:
    for text in req.prompts:
        yield encode_prompt(ctx, text)


def respond(ctx: Ctx, req: CompletionRequest, cs: list[Completion], record: bool) -> dict:
    rid, created = response_id("cmpl")
    groups = best_rows(cs, req)
    choices = [enc.completion_choice(i * req.n + j, p, c, req.echo, req.logprobs)
               for i, (p, (rows, _)) in enumerate(zip(req.prompts, groups, strict=True)) for j, c in enumerate(rows)]
    firsts = [rows[0] for rows, _ in groups]  # the prompt is counted once; every generated row's tokens
    return enc.text_completion(rid, ctx.model_name, created, choices, sum(c.prompt_tokens for c in firsts),
                               sum(c.generated_tokens for c in cs), cached_tokens=sum(c.cached_tokens for c in firsts))


class Stream:
    openai = True

    def __init__(self, ctx: Ctx, req: CompletionRequest, handles: list[RequestHandle]) -> None:
        self.rid, self.created = response_id("cmpl")
        self.name, self.req, self.handles = ctx.model_name, req, handles

    def _sse(self, choices: list[dict], prompt_tokens: int = 0, completion_tokens: int = 0,
             cached_tokens: int = 0, chunk: bool = True) -> bytes:
        return enc.sse(enc.text_completion(self.rid, self.name, self.created, choices, prompt_tokens,
                                           completion_tokens, chunk=chunk, cached_tokens=cached_tokens), openai=True)

    def _chunk(self, text: str, finish: str | None = None, lp: dict | None = None, index: int = 0) -> bytes:
        return self._sse([{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}])

    def head(self) -> Iterator[bytes]:
        if self.req.echo:
            for i in range(len(self.handles)):
                yield self._chunk(self.req.prompts[0], index=i)

    def token(self, ev: TokenEvent, n: int, index: int = 0) -> Iterator[bytes]:
        alternatives = self.req.logprobs
        lp = enc.completion_token_logprobs(ev, bool(alternatives)) if alternatives is not None else None
        finish = enc.openai_finish(ev.finish_reason) if ev.finish_reason is not None else None
        yield self._chunk(ev.text, finish, lp, index)

    def tail(self, tokens: int) -> Iterator[bytes]:
        if self.req.include_usage:
            h = self.handles[0]
            yield self._sse([], h.prompt_tokens, tokens, h.cached_tokens, chunk=False)
        yield enc.DONE


KIND = Kind("completion", "prompt", "completions", CompletionRequest, parse_completion, prompts, respond, Stream,
            may_sample)
