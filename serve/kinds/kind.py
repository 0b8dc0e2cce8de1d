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
    def stream(self) -> bool: ...  # answer with SSE (one sequence)
    @property
    def constraint(self) -> Constraint | None: ...  # every sequence's output matches it (None: free text)


R = TypeVar("R", bound=Request)


class StreamEncoder(Protocol):
    """The SSE events of one streamed sequence. serve/generate.py runs the one loop: head(), then token() per
    generated token; a sequence that fails ends with an error event, framed by `openai`."""

    openai: bool  # OpenAI framing ("data: " and [DONE] after an error event); False: TGI

    def head(self) -> Iterable[bytes]: ...  # before the first token (OpenAI: the role chunk; the echoed prompt)
    # n: tokens so far, this one included; the event with finish_reason set is the last: its events close the stream
    def token(self, ev: TokenEvent, n: int) -> Iterable[bytes]: ...


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
    stream: Callable[[Ctx, R, RequestHandle], StreamEncoder]  # the encoder of its one streamed sequence
    # (a decoded body of this kind, the batch job's default parameters) -> whether it would be sampled
    # rather than greedy, judged the way its parser will (a batch record that samples gets its own seed)
    may_sample: Callable[[dict[str, Any], Mapping[str, Any]], bool]
