"""Request parsing and validation (torch-free): body -> JSON -> a typed request with SamplingParams.

Shapes: TGI `{"inputs", "parameters", "stream"}` (here), OpenAI chat / completions (serve/openai.py).
Every problem raises ProtocolError carrying its HTTP status: 400 bad JSON, 413 too big,
415 wrong content type, 422 a field that is unknown, of the wrong type or out of range.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from model.types import SamplingParams

JSON_TYPES = frozenset({"application/json", "text/json"})
JSONL_TYPES = frozenset({"application/jsonlines", "application/x-jsonlines", "application/jsonl",
                         "application/json-lines", "application/x-ndjson"})
MAX_STOP = 16  # stop strings per request
MAX_TOP_N = 20  # alternatives per generated token
_U64 = 2**64
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


class ProtocolError(Exception):
    def __init__(self, status: int, message: str, error_type: str = "validation") -> None:
        message = message if len(message) <= 500 else message[:497] + "..."  # user text may be echoed
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type


def invalid(message: str) -> ProtocolError:
    return ProtocolError(422, message, "validation")


@dataclass(frozen=True)
class Limits:
    """What the server allows, from serve/config.py (so parsing needs no environment)."""

    default_max_new_tokens: int = 256
    max_new_tokens: int = 16383  # upper bound for a request's max_new_tokens
    # SamplingParams field -> value applied before the request's own fields (batch CLI defaults)
    base: dict[str, Any] = field(default_factory=dict)


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


def split_lines(body: bytes) -> list[bytes]:
    """JSON Lines body -> raw lines (one per input line; a final newline ends the last line)."""
    lines = body.split(b"\n")
    if lines and lines[-1].strip() == b"":
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


# ---- TGI ----

TGI_TOP = frozenset({"inputs", "parameters", "stream"})
TGI_PARAMS = frozenset({
    "max_new_tokens", "temperature", "top_k", "top_p", "typical_p", "do_sample", "seed", "repetition_penalty",
    "frequency_penalty", "stop", "truncate", "return_full_text", "details", "decoder_input_details",
    "top_n_tokens", "best_of", "watermark", "grammar", "adapter_id",
})


@dataclass(frozen=True)
class TextRequest:
    """TGI shape. `batched`: inputs came as a list (the response is one element per input)."""

    inputs: tuple[str, ...]
    params: SamplingParams
    batched: bool = False
    stream: bool = False
    details: bool = False
    return_full_text: bool = False
    truncate: int | None = None  # keep only the last `truncate` prompt tokens


def tgi_params(raw: Any, limits: Limits) -> tuple[dict[str, Any], dict[str, Any]]:
    """TGI "parameters" -> (SamplingParams fields, response options). Also used for batch defaults."""
    f = Fields({} if raw is None else raw, "parameters", TGI_PARAMS)
    f.null_or("best_of", (1,), "only best_of=1 is implemented")
    f.null_or("watermark", (False,), "watermarking is not implemented")
    f.null_or("decoder_input_details", (False,), "prompt token logprobs are not computed")
    f.null_or("grammar", (), "grammar-constrained decoding is not implemented")
    f.null_or("adapter_id", (), "adapters are not supported")
    v: dict[str, Any] = {
        **max_new(f, ("max_new_tokens",), limits),
        "temperature": f.float("temperature", 0.0, 100.0),
        "top_k": f.int("top_k", 0, 1_000_000),
        "top_p": f.float("top_p", 0.0, 1.0, lo_open=True),
        "typical_p": f.float("typical_p", 0.0, 1.0, lo_open=True),
        "repetition_penalty": f.float("repetition_penalty", 0.0, 100.0, lo_open=True),
        "frequency_penalty": f.float("frequency_penalty", -2.0, 2.0),
        "seed": f.seed("seed"),
        "stop": f.stop("stop"),
        "top_n_tokens": f.int("top_n_tokens", 0, MAX_TOP_N),
    }
    do_sample = f.bool("do_sample")
    # TGI: any sampling knob away from its neutral value turns sampling on.
    warped = (v["temperature"] not in (None, 1.0) or (v["top_k"] or 0) > 0
              or (v["top_p"] or 1.0) < 1.0 or (v["typical_p"] or 1.0) < 1.0)
    if do_sample is not None or warped:
        v["do_sample"] = bool(do_sample) or warped
    details = bool(f.bool("details"))
    if details:
        v["logprobs"] = True
    opts = {"details": details, "return_full_text": bool(f.bool("return_full_text")),
            "truncate": f.int("truncate", 1, 10_000_000)}
    return v, opts


def parse_tgi(obj: dict, limits: Limits) -> TextRequest:
    f = Fields(obj, "", TGI_TOP)
    raw = obj.get("inputs")
    batched = isinstance(raw, list)
    inputs = raw if batched else [raw]
    if not inputs:
        raise invalid("inputs must not be empty")
    for i, text in enumerate(inputs):
        where = f"inputs[{i}]" if batched else "inputs"
        if not isinstance(text, str):
            raise invalid(f"{where} must be a string")
        if not text:
            raise invalid(f"{where} must not be empty")
    stream = bool(f.bool("stream"))
    if stream and len(inputs) > 1:
        raise invalid("stream=true takes a single input, not a list of several")
    values, opts = tgi_params(obj.get("parameters"), limits)
    return TextRequest(inputs=tuple(inputs), params=sampling_params(limits, values), batched=batched,
                       stream=stream, **opts)


def parse_request(obj: Any, limits: Limits, route: str = "invocations"):
    """A decoded JSON body -> TextRequest | ChatRequest | CompletionRequest, chosen by shape."""
    from serve import openai  # local: openai imports this module

    if route == "chat":
        return openai.parse_chat(obj, limits)
    if route == "completions":
        return openai.parse_completion(obj, limits)
    if isinstance(obj, str):  # a bare JSON string (JSON Lines records) is a TGI input
        obj = {"inputs": obj}
    if not isinstance(obj, dict):
        raise invalid("body must be a JSON object with 'inputs', 'messages' or 'prompt'")
    if "messages" in obj:
        return openai.parse_chat(obj, limits)
    if "inputs" in obj:
        return parse_tgi(obj, limits)
    if "prompt" in obj:
        return openai.parse_completion(obj, limits)
    raise invalid("body must have 'inputs' (TGI), 'messages' (chat) or 'prompt' (completions)")
