"""Hugging Face TGI: `{"inputs": str | [str], "parameters": {...}, "stream": bool}` on /invocations.

One sequence per input (`best_of` rows forked from its one prefill: the best by cumulative logprob answers, the
others go in details.best_of_sequences); the response is one element per input (a JSON Lines record with a single input,
not a list, answers with the element); the stream is TGI token events, the last carrying generated_text
and details.
"""

from __future__ import annotations

from collections.abc import Iterator

from model.types import Completion, TokenEvent
from serve import encoders as enc
from serve.engine_client import RequestHandle
from serve.kinds.kind import Kind, best_rows
from serve.prompts import Ctx, encode_prompt
from serve.protocol.tgi import TextRequest, may_sample, parse_tgi


def prompts(ctx: Ctx, req: TextRequest) -> Iterator[tuple[int, ...]]:
    for text in req.inputs:
        yield encode_prompt(ctx, text, req.truncate)


def respond(ctx: Ctx, req: TextRequest, cs: list[Completion], record: bool) -> list[dict] | dict:
    items = [enc.tgi_best_of(p, rows[0], others, req.details, req.return_full_text, req.params.top_n_tokens)
             for p, (rows, others) in zip(req.inputs, best_rows(cs, req), strict=True)]
    return items[0] if record and not req.batched else items


class Stream:
    openai = False

    def __init__(self, ctx: Ctx, req: TextRequest, handles: list[RequestHandle]) -> None:
        (self.handle,) = handles  # best_of > 1 is not streamed (serve/protocol/tgi.py)
        self.req = req
        self.text = req.inputs[0] if req.return_full_text else ""

    def head(self) -> tuple[bytes, ...]:
        return ()

    def token(self, ev: TokenEvent, n: int, index: int = 0) -> Iterator[bytes]:
        self.text += ev.text
        final = (self.text, self.handle.result()) if ev.finish_reason is not None else None
        yield enc.tgi_event(n - 1, ev, final, self.req.params.top_n_tokens)

    def tail(self, tokens: int) -> tuple[bytes, ...]:
        return ()


KIND = Kind("tgi", "inputs", None, TextRequest, parse_tgi, prompts, respond, Stream, may_sample)
