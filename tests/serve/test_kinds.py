"""serve/kinds: the table of request kinds is the only way a request's kind is decided, and a new kind is its
module plus one row (shown with a toy kind run through the generate, JSON Lines and batch-seed paths)."""

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from model.types import SamplingParams, TokenEvent
from serve import generate, kinds
from serve.batch.records import may_sample
from serve.handler import handle_record
from serve.kinds.kind import Kind
from serve.prompts import Ctx, encode_prompt
from serve.protocol import ChatRequest, CompletionRequest, Limits, ProtocolError, TextRequest
from serve.protocol.fields import sampling_params
from tests.fakes import fake_engine

LIMITS = Limits(default_max_new_tokens=3, max_new_tokens=50)
SERVE = Path(__file__).resolve().parents[2] / "serve"


def test_the_table_has_one_row_per_kind():
    assert [k.name for k in kinds.KINDS] == ["chat", "tgi", "completion"]  # precedence
    for attr in ("name", "key", "request_type"):
        values = [getattr(k, attr) for k in kinds.KINDS]
        assert len(set(values)) == len(values), attr
    assert {k.route for k in kinds.KINDS} == {"chat/completions", None, "completions"}


@pytest.mark.parametrize("body, kind, request_type", [
    ({"messages": [{"role": "user", "content": "x"}]}, "chat", ChatRequest),
    ({"inputs": "x"}, "tgi", TextRequest),
    ("bare text", "tgi", TextRequest),
    ({"prompt": "x"}, "completion", CompletionRequest),
])
def test_a_body_selects_its_kind_and_the_request_names_it_again(body, kind, request_type):
    k, obj = kinds.select(body)
    assert k.name == kind and isinstance(obj, dict)
    req = kinds.parse_request(body, LIMITS)
    assert type(req) is request_type and kinds.kind_of(req) is k and kinds.is_request(req)


def test_bodies_no_kind_takes():
    assert kinds.select({"text": "x"}) is None and kinds.select([1]) is None
    with pytest.raises(ProtocolError, match="body must have 'messages' \\(chat\\) or 'inputs'"):
        kinds.parse_request({"text": "x"}, LIMITS)
    with pytest.raises(TypeError, match="not a request"):
        kinds.kind_of({"inputs": "x"})
    assert not kinds.is_request({"inputs": "x"})


def test_the_request_path_never_asks_which_kind_a_request_is():
    # generate.py and handler.py run every kind through its row: they name no request type
    for name in ("generate.py", "handler.py", "app.py"):
        text = (SERVE / name).read_text()
        assert not any(t in text for t in ("TextRequest", "ChatRequest", "CompletionRequest")), name


# ---- a new kind: its module (here, inline) and one row ----

@dataclass(frozen=True)
class ShoutRequest:
    text: str
    params: SamplingParams
    stream: bool = False
    constraint: None = None  # free text (a kind may constrain its outputs: serve/kinds/kind.py Request)
    n: int = 1
    best_of: int = 1


def _parse(obj, limits):
    return ShoutRequest(obj["shout"], sampling_params(limits, {}), bool(obj.get("stream")))


def _prompts(ctx, req) -> Iterator[tuple[int, ...]]:
    yield encode_prompt(ctx, req.text)


class _Stream:
    openai = False

    def __init__(self, ctx, req, handles):
        pass

    def head(self):
        yield b"<"

    def token(self, ev: TokenEvent, n: int, index: int = 0):
        yield ev.text.upper().encode()

    def tail(self, tokens: int):
        yield b">"


SHOUT = Kind("shout", "shout", None, ShoutRequest, _parse, _prompts,
             lambda ctx, req, cs, record: {"shouted": cs[0].text.upper(), "record": record}, _Stream,
             lambda obj, defaults: bool(obj.get("loud")))


def test_a_new_kind_is_its_module_plus_one_row(monkeypatch):
    monkeypatch.setattr(kinds, "KINDS", (*kinds.KINDS, SHOUT))
    eng = fake_engine()
    ctx = Ctx(eng, "fake")
    req = kinds.parse_request({"shout": "bcd"}, LIMITS)
    assert kinds.kind_of(req) is SHOUT
    # the fake model answers each token with the next letter: b c d -> e f g
    assert generate.start(ctx, req).finish() == {"shouted": "EFG", "record": False}
    assert b"".join(generate.stream(ctx, replace(req, stream=True))) == b"<EFG>"
    assert handle_record(eng, json.dumps({"shout": "bcd"}), {"max_new_tokens": 2}) == {"shouted": "EF", "record": True}
    assert may_sample({"shout": "x", "loud": True}, {}) and not may_sample({"shout": "x"}, {})
