"""What a request kind is: one row of the table in serve/kinds/__init__.py (torch-free).

A kind is everything the server does with one request shape, in one module (serve/kinds/<name>.py): how a
body selects it and is parsed, the prompts it submits, the response it builds from their completions, the
encoder of its stream, and whether a record of it samples. serve/generate.py runs any kind through these
alone: it never asks which kind a request is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from model.types import Completion, Constraint, SamplingParams, TokenEvent
from serve.engine_client import RequestHandle
from serve.prompts import Ctx
from serve.protocol import Limits


class Request(Protocol):
    """What serve/generate.py and the handler read of any kind's request (the rest is its kind's)."""

    @property
    def params(self) -> SamplingParams: ...  # one SamplingParams for every sequence of the request
    @property
    def stream(self) -> bool: ...  # answer with SSE (one prompt: its n rows)
    @property
    def constraint(self) -> Constraint | None: ...  # every sequence's output matches it (None: free text)
    @property
    @property
    def n(self) -> int: ...  # answers per prompt
    @property
    def best_of(self) -> int: ...  # rows generated per prompt (>= n), forked from one prefill


R = TypeVar("R", bound=Request)


class StreamEncoder(Protocol):
    """The SSE events of one streamed prompt's rows (n > 1: OpenAI `index`). serve/generate.py runs the one loop:
    head(), then token() per generated token of any row, then tail() once every row has ended; a row that fails
    ends the stream with an error event, framed by `openai`."""

    openai: bool  # OpenAI framing ("data: " and [DONE] after an error event); False: TGI

    def head(self) -> Iterable[bytes]: ...  # before the first token (OpenAI: the role chunk; the echoed prompt)
    # n: the row's tokens so far, this one included; the event with finish_reason set is the row's last
    def token(self, ev: TokenEvent, n: int, index: int = 0) -> Iterable[bytes]: ...
    def tail(self, tokens: int) -> Iterable[bytes]: ...  # after every row's last event (usage, [DONE]); tokens: all rows'


@dataclass(frozen=True)
class Kind(Generic[R]):
    name: str
    key: str  # the body field that selects this kind on /invocations
    route: str | None  # served at /v1/<route> too (OpenAI clients)
    request_type: type[R]
    parse: Callable[[Any, Limits], R]  # a decoded JSON body -> the request; ProtocolError with its status
    # the prompt ids of its sequences, lazily: a streamed request (one sequence) takes only the first
    prompts: Callable[[Ctx, R], Iterator[tuple[int, ...]]]
    # the response object from the completions, in prompt order; `record`: a JSON Lines line (or batch record)
    respond: Callable[[Ctx, R, list[Completion], bool], Any]
    stream: Callable[[Ctx, R, list[RequestHandle]], StreamEncoder]  # the encoder of its one streamed prompt's rows
    # (a decoded body of this kind, the batch job's default parameters) -> whether it would be sampled
    # rather than greedy, judged the way its parser will (a batch record that samples gets its own seed)
    may_sample: Callable[[dict[str, Any], Mapping[str, Any]], bool]


def best_rows(cs: list[Completion], req: Request) -> list[tuple[list[Completion], list[Completion]]]:
    """Per prompt (completions come `best_of` per prompt, in prompt order): (its n answers, the other rows). With
    best_of > n the answers are the n rows of highest cumulative logprob, best first (vLLM's and TGI's rule); else
    the rows in order."""
    rows, out = max(req.best_of, req.n), []
    for i in range(0, len(cs), rows):
        group = cs[i:i + rows]
        if rows > req.n:
            group = sorted(group, key=lambda c: -sum(c.logprobs))
        out.append((group[:req.n], group[req.n:]))
    return out
