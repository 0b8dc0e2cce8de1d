"""Request kinds (torch-free): the one table, and everything that picks a row of it.

    kind.py        what a kind is (Kind: parse, prompts, respond, stream encoder, may_sample)
    tgi.py         Hugging Face TGI `{"inputs", "parameters", "stream"}`
    chat.py        OpenAI chat completions `{"messages", ...}`
    completion.py  OpenAI completions `{"prompt", ...}`

A new request kind is its module plus one row in KINDS: /invocations selects it by its body key, its OpenAI
route (if any) is served, serve/generate.py runs and streams it, and batch records of it get seeds when they
sample, all through the row.
"""

from __future__ import annotations

from typing import Any

from serve.kinds import chat, completion, tgi
from serve.kinds.kind import Kind, Request
from serve.protocol import Limits, invalid

KINDS: tuple[Kind[Any], ...] = (chat.KIND, tgi.KIND, completion.KIND)  # precedence when a body has several keys


def _shapes() -> str:
    return " or ".join(f"'{k.key}' ({k.name})" for k in KINDS)


def kind_of(req: Request) -> Kind[Any]:
    """The kind of a parsed request."""
    for k in KINDS:
        if isinstance(req, k.request_type):
            return k
    raise TypeError(f"not a request: {type(req).__name__}")


def is_request(obj: Any) -> bool:
    """Whether `obj` is a parsed request already (a user's input_fn may return one) rather than a body."""
    return any(isinstance(obj, k.request_type) for k in KINDS)


def select(obj: Any) -> tuple[Kind[Any], dict[str, Any]] | None:
    """The kind a decoded /invocations body selects by its keys, with the body as an object (a bare JSON
    string, as JSON Lines records may be, is a TGI input); None when no kind takes it."""
    if isinstance(obj, str):
        obj = {tgi.KIND.key: obj}
    if isinstance(obj, dict):
        for k in KINDS:
            if k.key in obj:
                return k, obj
    return None


def parse_request(obj: Any, limits: Limits, kind: str | None = None) -> Request:
    """A decoded JSON body -> the request of `kind` (an OpenAI route), else of the kind its keys select."""
    if kind is not None:
        return next(k for k in KINDS if k.name == kind).parse(obj, limits)
    found = select(obj)
    if found is None:
        raise invalid(f"body must be a JSON object with {_shapes()}" if not isinstance(obj, dict)
                      else f"body must have {_shapes()}")
    k, body = found
    return k.parse(body, limits)


__all__ = ["KINDS", "Kind", "Request", "is_request", "kind_of", "parse_request", "select"]
