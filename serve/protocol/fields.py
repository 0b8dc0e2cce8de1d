"""What every request shape shares (torch-free): body decoding, typed field access, the server's limits,
and ProtocolError carrying its HTTP status: 400 bad JSON, 413 too big, 415 wrong content type,
422 a field that is unknown, of the wrong type or out of range.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from model.types import EngineConfig, RequestError, SamplingParams

JSON_TYPES = frozenset({"application/json", "text/json"})
JSONL_TYPES = frozenset({"application/jsonlines", "application/x-jsonlines", "application/jsonl",
                         "application/json-lines", "application/x-ndjson"})
MAX_STOP = 16  # stop strings per request
MAX_TOP_N = 20  # alternatives per generated token
_U64 = 2**64
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


class ProtocolError(RequestError):
    """A request that cannot be parsed or validated (never reached the engine)."""

    def __init__(self, status: int, message: str, error_type: str = "validation") -> None:
        super().__init__(message, status, error_type)


def invalid(message: str) -> ProtocolError:
    return ProtocolError(422, message, "validation")


@dataclass(frozen=True)
class Limits:
    """What the server allows, from serve/config.py (so parsing needs no environment)."""

    default_max_new_tokens: int = SamplingParams.max_new_tokens  # the one default length: SamplingParams'
    max_new_tokens: int = 16383  # upper bound for a request's max_new_tokens
    # SamplingParams field -> value applied before the request's own fields (batch CLI defaults)
    base: dict[str, Any] = field(default_factory=dict)
    max_n: int = 8  # rows one request may ask for (n, best_of): MAX_N, at most the engine's slots

    @classmethod
    def from_config(cls, engine: EngineConfig, default_max_new_tokens: int = SamplingParams.max_new_tokens,
                    base: Mapping[str, Any] | None = None, max_n: int = 8) -> Limits:
        """The limits of an engine: a request may ask for up to max_total_tokens - 1 new tokens, and the
        server's default (MAX_NEW_TOKENS) yields to a smaller context; n / best_of up to max_n and the slots."""
        top = max(1, engine.max_total_tokens - 1)
        return cls(min(default_max_new_tokens, top), top, dict(base or {}),
                   max(1, min(max_n, engine.max_concurrent_seqs)))

    def with_base(self, values: Mapping[str, Any]) -> Limits:
        """These limits with `values` (SamplingParams fields) added to the base under each request's own."""
        return dataclasses.replace(self, base={**self.base, **values})


# ---- body decoding ----

def media_type(content_type: str | None) -> str:
    """'application/json; charset=utf-8' -> 'application/json'; missing -> application/json."""
    if not content_type or not content_type.strip():
        return "application/json"
    return content_type.split(";", 1)[0].strip().lower()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_json(body: bytes | str) -> Any:
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
    except UnicodeDecodeError as e:
        raise ProtocolError(400, f"body is not valid UTF-8 (byte {e.start})", "bad_request") from None
    if not text.strip():
        raise ProtocolError(400, "empty body: expected a JSON object", "bad_request")
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
        if _SURROGATE.search(text):  # "\ud800" escapes decode to lone surrogates no tokenizer accepts
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return obj
    except RecursionError:
        raise ProtocolError(400, "JSON nested too deeply", "bad_request") from None
    except UnicodeEncodeError:
        raise ProtocolError(400, "JSON string holds an unpaired UTF-16 surrogate escape", "bad_request") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, integers with too many digits
        raise ProtocolError(400, f"invalid JSON: {e}", "bad_request") from None


def _blank(line: bytes) -> bool:
    """Blank as decode_json sees it ("empty body"): str.strip() also strips Unicode whitespace such as \x1f."""
    try:
        return not line.decode("utf-8").strip()
    except UnicodeDecodeError:
        return False


def split_lines(body: bytes) -> list[bytes]:
    """JSON Lines body -> raw lines (one per input line; a final blank line ends the last line, no record)."""
    lines = body.split(b"\n")
    if lines and _blank(lines[-1]):
        lines.pop()
    return [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]


# ---- field validation ----

class Fields:
    """Typed access to one JSON object; every error names the field (`where` + name)."""

    def __init__(self, obj: Any, where: str, allowed: set[str] | frozenset[str]) -> None:
        if not isinstance(obj, dict):
            raise invalid(f"{where or 'body'} must be a JSON object")
        unknown = sorted(set(obj) - set(allowed))
        if unknown:
            raise invalid(f"unknown parameter(s) in {where or 'body'}: {', '.join(unknown)}")
        self.obj, self.where = obj, where

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str) -> Any:
        return self.obj.get(key)

    def int(self, key: str, lo: int, hi: int) -> int | None:
        v = self.obj.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise invalid(f"{self.name(key)} must be an integer")
        if not lo <= v <= hi:
            raise invalid(f"{self.name(key)} must be between {lo} and {hi}, got {v}")
        return v

    def float(self, key: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
        v = self.obj.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise invalid(f"{self.name(key)} must be a finite number")
        if v < lo or v > hi or (lo_open and v == lo):
            raise invalid(f"{self.name(key)} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
        return float(v)

    def bool(self, key: str) -> bool | None:
        v = self.obj.get(key)
        if v is not None and not isinstance(v, bool):
            raise invalid(f"{self.name(key)} must be true or false")
        return v

    def str(self, key: str) -> str | None:
        v = self.obj.get(key)
        if v is not None and not isinstance(v, str):
            raise invalid(f"{self.name(key)} must be a string")
        return v

    def stop(self, key: str) -> tuple[str, ...] | None:
        v = self.obj.get(key)
        if v is None:
            return None
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
            raise invalid(f"{self.name(key)} must be a non-empty string or a list of non-empty strings")
        if len(items) > MAX_STOP:
            raise invalid(f"{self.name(key)} has {len(items)} entries; at most {MAX_STOP}")
        return tuple(items)

    def seed(self, key: str) -> int | None:
        v = self.int(key, -(2**63), _U64 - 1)
        return None if v is None else v % _U64  # negative 64-bit seeds map onto the unsigned range

    def null_or(self, key: str, allowed: tuple[Any, ...], why: str) -> None:
        """A parameter we accept only at its default value (clients send it as null/false)."""
        v = self.obj.get(key)
        if v is not None and not any(v == a and type(v) is type(a) for a in allowed):
            raise invalid(f"{self.name(key)}={json.dumps(v)[:40]} is not supported: {why}")


def max_new(f: Fields, keys: tuple[str, ...], limits: Limits) -> dict[str, Any]:
    for key in keys:
        v = f.int(key, 1, limits.max_new_tokens)
        if v is not None:
            return {"max_new_tokens": v}
    return {}


def sampling_params(limits: Limits, values: dict[str, Any]) -> SamplingParams:
    """limits.base < request values (None = unset) -> SamplingParams with the server's default length."""
    merged: dict[str, Any] = {"max_new_tokens": limits.default_max_new_tokens}
    for layer in (limits.base, values):
        merged.update({k: v for k, v in layer.items() if v is not None})
    return SamplingParams(**merged)
