"""Response encoders (torch-free): Completion / TokenEvent -> TGI and OpenAI JSON, SSE events, errors.

Every SSE event is `data:<json>` followed by a blank line, so clients that receive the stream in
arbitrary pieces (InvokeEndpointWithResponseStream) can re-split it on "\\n\\n".
"""

from __future__ import annotations

import json
from typing import Any

from model.types import Completion, FinishReason, RequestError, TokenEvent, TopToken
from serve.protocol.toolcalls import parse_tool_calls

DONE = b"data: [DONE]\n\n"


_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def dumps(obj: Any) -> str:
    # Non-ASCII stays readable, but the characters str.splitlines() treats as line breaks are escaped, so a
    # JSON Lines response always splits into exactly one line per record however the client splits it.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).translate(_LINE_BREAKS)


def json_body(obj: Any) -> bytes:
    # A JSON response body ends with a newline: line-based readers (langchain-aws's LineIterator) wait for one.
    return (dumps(obj) + "\n").encode()


def jsonl_body(objs: list) -> bytes:
    # One line per object, each ending in a newline (the JSON Lines response of a JSON Lines request).
    return "".join(dumps(x) + "\n" for x in objs).encode()


def sse(obj: Any, openai: bool = False) -> bytes:
    # TGI writes "data:{...}", OpenAI "data: {...}"; both are valid SSE.
    return (("data: " if openai else "data:") + dumps(obj) + "\n\n").encode()


def error_body(message: str, error_type: str) -> dict:
    """The one error body: {"error": message, "error_type": kind}."""
    return {"error": message, "error_type": error_type}


def error_of(e: BaseException) -> tuple[int, dict]:
    """Any exception -> (HTTP status, error body): a RequestError says both; anything else is a 500 that
    names only the exception's type (never a message or trace that could leak internals)."""
    if isinstance(e, RequestError):
        return e.status, error_body(e.message, e.error_type)
    return 500, error_body(f"internal error: {type(e).__name__}", "internal")


def _lp(x: float) -> float | None:
    return x if x == x and abs(x) != float("inf") else None  # NaN / -inf logprobs are not JSON


# ---- TGI ----

def tgi_token(token_id: int, text: str, logprob: float, special: bool) -> dict:
    return {"id": token_id, "text": text, "logprob": _lp(logprob), "special": special}


def _top(tops: tuple[TopToken, ...]) -> list[dict]:
    return [{"id": t.token_id, "text": t.text, "logprob": _lp(t.logprob), "special": False} for t in tops]


def tgi_details(c: Completion, with_tokens: bool, top_n: int = 0) -> dict:
    d: dict[str, Any] = {
        "finish_reason": c.finish_reason.value,
        "generated_tokens": c.generated_tokens,
        "prompt_tokens": c.prompt_tokens,
        "input_length": c.prompt_tokens,
        "cached_tokens": c.cached_tokens,  # prompt tokens resumed from a state snapshot (prefix reuse)
        "seed": c.seed,
    }
    if with_tokens:
        d["prefill"] = []
        d["tokens"] = [tgi_token(i, t, lp, s) for i, t, lp, s in zip(c.token_ids, c.token_texts, c.logprobs,
                                                                     c.specials, strict=True)]
        if top_n:
            d["top_tokens"] = [_top(tops) for tops in c.top_tokens]
    return d


def tgi_item(prompt: str, c: Completion, details: bool, return_full_text: bool, top_n: int = 0) -> dict:
    text = prompt + c.text if return_full_text else c.text
    return {"generated_text": text, "details": tgi_details(c, details, top_n)}


def tgi_best_of(prompt: str, best: Completion, others: list[Completion], details: bool, return_full_text: bool,
                top_n: int = 0) -> dict:
    """A TGI answer of `best_of` rows: the best one, the others in details.best_of_sequences (TGI's shape)."""
    item = tgi_item(prompt, best, details, return_full_text, top_n)
    if details and others:
        item["details"]["best_of_sequences"] = [
            {"generated_text": (prompt if return_full_text else "") + c.text,
             **{k: v for k, v in tgi_details(c, True, top_n).items()
                if k not in ("prompt_tokens", "input_length", "cached_tokens")}} for c in others]
    return item


def tgi_event(index: int, ev: TokenEvent, final: tuple[str, Completion] | None, top_n: int = 0) -> bytes:
    """One streamed token; the last carries generated_text and details (TGI shape)."""
    obj: dict[str, Any] = {"index": index, "token": tgi_token(ev.token_id, ev.text, ev.logprob, ev.special),
                           "generated_text": None, "details": None}
    if top_n:
        obj["top_tokens"] = _top(ev.top_tokens)
    if final is not None:
        text, c = final
        obj["generated_text"] = text
        obj["details"] = tgi_details(c, False)
    return sse(obj)


# ---- OpenAI ----

def openai_finish(reason: FinishReason, has_calls: bool = False) -> str:
    """has_calls: the answer holds tool calls, the last one whole (a cut call ends "length" / "stop")."""
    if has_calls:
        return "tool_calls"
    return "length" if reason == FinishReason.LENGTH else "stop"


def reproducible(obj: Any) -> Any:
    """A record's response without the counts that depend on what the prefix cache held (cached_tokens):
    JSON Lines records and batch outputs stay byte-identical between runs (batch resume relies on it)."""
    items = obj if isinstance(obj, list) else [obj]
    for item in items:
        if isinstance(item, dict):
            if isinstance(item.get("details"), dict):
                item["details"].pop("cached_tokens", None)
            if isinstance(item.get("usage"), dict):
                item["usage"].pop("prompt_tokens_details", None)
    return obj


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI usage; cached_tokens: prompt tokens resumed from a state snapshot (prefix reuse, sessions)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chat_logprobs(texts, logprobs, tops) -> dict:
    def entry(text: str, lp: float) -> dict:
        return {"token": text, "logprob": _lp(lp), "bytes": list(text.encode())}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(x.text, x.logprob) for x in top]}
                        for t, lp, top in zip(texts, logprobs, tops, strict=True)]}


def chat_message(text: str, parse_calls: bool) -> tuple[dict, bool]:
    """-> (assistant message, whether it holds tool calls, all whole). Tool calls are parsed only when the
    request may call tools (tools given, tool_choice not "none")."""
    content, calls, complete = parse_tool_calls(text) if parse_calls else (text, [], True)
    msg: dict[str, Any] = {"role": "assistant", "content": content if (content or not calls) else None}
    if calls:
        msg["tool_calls"] = calls
    return msg, bool(calls) and complete


def chat_choice(index: int, c: Completion, parse_calls: bool, logprobs: bool) -> dict:
    msg, has_calls = chat_message(c.text, parse_calls)
    choice: dict[str, Any] = {"index": index, "message": msg, "logprobs": None,
                              "finish_reason": openai_finish(c.finish_reason, has_calls)}
    if logprobs:
        choice["logprobs"] = chat_logprobs(c.token_texts, c.logprobs, c.top_tokens)
    return choice


def chat_completion(rid: str, model: str, created: int, c: Completion, parse_calls: bool, logprobs: bool,
                    rows: list[Completion] | None = None) -> dict:
    """`rows`: every choice of an n > 1 request (c the first); usage counts the prompt once, every row's tokens."""
    rows = rows or [c]
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [chat_choice(i, r, parse_calls, logprobs) for i, r in enumerate(rows)],
            "usage": usage(c.prompt_tokens, sum(r.generated_tokens for r in rows), c.cached_tokens)}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None = None,
               logprobs: dict | None = None, index: int = 0) -> bytes:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}, openai=True)


def usage_chunk(rid: str, model: str, created: int, prompt_tokens: int, completion_tokens: int,
                cached_tokens: int = 0) -> bytes:
    return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
                "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}, openai=True)


def completion_choice(index: int, prompt: str, c: Completion, echo: bool, logprobs: int | None) -> dict:
    choice: dict[str, Any] = {"index": index, "text": (prompt if echo else "") + c.text, "logprobs": None,
                              "finish_reason": openai_finish(c.finish_reason)}
    if logprobs is not None:
        offsets, pos = [], len(prompt) if echo else 0
        for t in c.token_texts:
            offsets.append(pos)
            pos += len(t)
        choice["logprobs"] = {
            "tokens": list(c.token_texts), "token_logprobs": [_lp(x) for x in c.logprobs],
            "top_logprobs": [{t.text: _lp(t.logprob) for t in tops} for tops in c.top_tokens] if logprobs else None,
            "text_offset": offsets,
        }
    return choice


def completion_token_logprobs(ev: TokenEvent, alternatives: bool) -> dict:
    """One streamed token's completions-API logprobs (its top_logprobs when alternatives were asked for)."""
    return {"tokens": [ev.text], "token_logprobs": [_lp(ev.logprob)],
            "top_logprobs": [{t.text: _lp(t.logprob) for t in ev.top_tokens}] if alternatives else None}


def text_completion(rid: str, model: str, created: int, choices: list[dict], prompt_tokens: int,
                    completion_tokens: int, chunk: bool = False, cached_tokens: int = 0) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            **({} if chunk else {"usage": usage(prompt_tokens, completion_tokens, cached_tokens)})}
