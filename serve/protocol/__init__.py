"""Request parsing and validation (torch-free): body -> JSON -> a typed request with SamplingParams.

    fields.py     body decoding, typed field access, Limits, ProtocolError (what every shape shares)
    tgi.py        Hugging Face TGI `{"inputs", "parameters", "stream"}`
    openai.py     OpenAI chat completions `{"messages", ...}` and completions `{"prompt", ...}`
    toolcalls.py  Granite `<tool_call>` output -> OpenAI `tool_calls` (what the chat shape returns)

KINDS is the one table of request kinds: the body key that selects a kind on /invocations, its
OpenAI route (if any) and its parser. serve/generate.py runs each kind; serve/encoders.py frames it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serve.protocol.fields import (
    JSON_TYPES,
    JSONL_TYPES,
    Limits,
    ProtocolError,
    decode_json,
    invalid,
    media_type,
    split_lines,
)
from serve.protocol.openai import ChatRequest, CompletionRequest, parse_chat, parse_completion
from serve.protocol.tgi import TextRequest, parse_tgi, tgi_params


@dataclass(frozen=True)
class Kind:
    name: str
    key: str  # the body field that selects this kind on /invocations
    route: str | None  # served at /v1/<route> too (OpenAI clients)
    parse: Callable[[Any, Limits], Any]
    request_type: type


KINDS: tuple[Kind, ...] = (  # in order of precedence when a body has several keys
    Kind("chat", "messages", "chat/completions", parse_chat, ChatRequest),
    Kind("tgi", "inputs", None, parse_tgi, TextRequest),
    Kind("completion", "prompt", "completions", parse_completion, CompletionRequest),
)
REQUEST_TYPES = tuple(k.request_type for k in KINDS)
_SHAPES = " or ".join(f"'{k.key}' ({k.name})" for k in KINDS)


def parse_request(obj: Any, limits: Limits, kind: str | None = None):
    """A decoded JSON body -> the request of `kind` (an OpenAI route), else of the kind its keys select."""
    if kind is not None:
        return next(k for k in KINDS if k.name == kind).parse(obj, limits)
    if isinstance(obj, str):  # a bare JSON string (JSON Lines records) is a TGI input
        obj = {"inputs": obj}
    if not isinstance(obj, dict):
        raise invalid(f"body must be a JSON object with {_SHAPES}")
    for k in KINDS:
        if k.key in obj:
            return k.parse(obj, limits)
    raise invalid(f"body must have {_SHAPES}")


__all__ = [
    "JSON_TYPES", "JSONL_TYPES", "KINDS", "REQUEST_TYPES", "ChatRequest", "CompletionRequest", "Kind", "Limits",
    "ProtocolError", "TextRequest", "decode_json", "invalid", "media_type", "parse_request", "split_lines",
    "tgi_params",
]
