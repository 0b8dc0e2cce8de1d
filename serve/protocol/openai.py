"""OpenAI chat-completions and completions request parsing (torch-free)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from model.types import Constraint, SamplingParams
from serve.protocol.constraints import declared_tools, response_format, tool_constraint
from serve.protocol.fields import MAX_TOP_N, Fields, Limits, invalid, max_new, sampling_params

ROLES = {"system", "user", "assistant", "tool", "developer"}
MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "refusal", "annotations"})
COMMON = frozenset({
    "model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "stream_options",
    "frequency_penalty", "presence_penalty", "user", "top_k", "repetition_penalty", "logit_bias",
})
CHAT = COMMON | {"messages", "tools", "tool_choice", "documents", "max_completion_tokens", "logprobs",
                 "top_logprobs", "response_format", "parallel_tool_calls"}
COMPLETION = COMMON | {"prompt", "echo", "logprobs", "suffix", "best_of", "response_format"}


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[dict, ...]
    params: SamplingParams
    tools: tuple[dict, ...] | None = None  # listed by the chat template (also under tool_choice "none")
    documents: tuple[dict, ...] | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    model: str | None = None
    constraint: Constraint | None = None  # response_format json, or the tool_choice's tool_calls
    calls: bool = False  # the answer may hold tool calls: parse them (tools given, tool_choice not "none")
    n: int = 1  # choices, forked from one prefill (model/engine/forks.py)
    best_of: int = 1  # rows generated (chat: = n)


@dataclass(frozen=True)
class CompletionRequest:
    prompts: tuple[str, ...]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None  # completions API: number of alternatives, None = no logprobs
    model: str | None = None
    constraint: Constraint | None = None  # response_format json
    n: int = 1  # choices per prompt
    best_of: int = 1  # rows generated per prompt (>= n); the n with the highest cumulative logprob are returned


def _common(f: Fields, limits: Limits, max_keys: tuple[str, ...]) -> dict[str, Any]:
    f.null_or("logit_bias", (), "logit_bias is not implemented")
    f.str("model")
    f.str("user")
    temperature = f.float("temperature", 0.0, 2.0)
    top_k = f.int("top_k", -1, 1_000_000)
    values: dict[str, Any] = {
        **max_new(f, max_keys, limits),
        "temperature": temperature,
        "top_p": f.float("top_p", 0.0, 1.0, lo_open=True),
        "top_k": None if top_k is None else max(top_k, 0),  # vLLM's -1 = off
        "stop": f.stop("stop"),
        "seed": f.seed("seed"),
        "frequency_penalty": f.float("frequency_penalty", -2.0, 2.0),
        "presence_penalty": f.float("presence_penalty", -2.0, 2.0),
        "repetition_penalty": f.float("repetition_penalty", 0.0, 100.0, lo_open=True),
        # OpenAI semantics: sampling at temperature 1 unless told otherwise; 0 means greedy.
        "do_sample": temperature is None or temperature > 0.0,
    }
    return values


def rows(f: Fields, limits: Limits, stream: bool, best_of: bool) -> tuple[int, int]:
    """(n, best_of): n choices (1..MAX_N); best_of (completions) rows generated, n..MAX_N, not streamed."""
    n = f.int("n", 1, limits.max_n) or 1
    b = f.int("best_of", 1, limits.max_n) if best_of else None
    if b is None:
        return n, n
    if b < n:
        raise invalid(f"best_of ({b}) must be >= n ({n})")
    if b > 1 and stream:
        raise invalid("best_of > 1 cannot be streamed (stream=true)")
    return n, b


def _stream(f: Fields) -> tuple[bool, bool]:
    stream = bool(f.bool("stream"))
    raw = f.get("stream_options")
    opts = Fields({} if raw is None else raw, f.name("stream_options"), {"include_usage"})
    return stream, bool(opts.bool("include_usage"))


def _content(msg: dict, where: str) -> str | None:
    content = msg.get("content")
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where}.content must be a string, null or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise invalid(f"{where}.content[{j}] must be {{\"type\": \"text\", \"text\": str}} (only text is supported)")
        texts.append(part["text"])
    return "".join(texts)


def _arguments(args: Any, where: str) -> Any:
    """A history call's arguments as the template renders them: an object (OpenAI clients send it JSON-encoded:
    decoded once, never twice); a string that is not JSON stays a JSON string, so the rendered call stays JSON."""
    if args is None:
        return {}
    if isinstance(args, str):
        if not args.strip():
            return {}
        try:
            args = json.loads(args)
        except ValueError:
            return json.dumps(args, ensure_ascii=False)  # the template writes a string as is: quote it
        return json.dumps(args, ensure_ascii=False) if isinstance(args, str) else args
    if not isinstance(args, (dict, list)):
        raise invalid(f"{where}.function.arguments must be a JSON object or a JSON-encoded string")
    return args


def _tool_calls(calls: Any, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise invalid(f"{where}.tool_calls must be a list")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid(f"{where}.tool_calls[{j}].function.name must be a string")
        out.append({**call, "type": "function",
                    "function": {"name": fn["name"], "arguments": _arguments(fn.get("arguments"), f"{where}.tool_calls[{j}]")}})
    return out


def _messages(raw: Any) -> tuple[dict, ...]:
    if not isinstance(raw, list) or not raw:
        raise invalid("messages must be a non-empty list")
    out = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        f = Fields(msg, where, MESSAGE_KEYS)
        role = f.str("role")
        if role not in ROLES:
            raise invalid(f"{where}.role must be one of {', '.join(sorted(ROLES))}")
        content = _content(msg, where)
        clean: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content or ""}
        for key in ("name", "tool_call_id"):
            if f.str(key) is not None:
                clean[key] = msg[key]
        if msg.get("tool_calls") is not None:
            clean["tool_calls"] = _tool_calls(msg["tool_calls"], where)
        elif content is None:
            raise invalid(f"{where}.content must not be null")
        out.append(clean)
    return tuple(out)


def _documents(raw: Any) -> tuple[dict, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise invalid("documents must be a list")
    docs = []
    for i, doc in enumerate(raw):
        if isinstance(doc, str):
            doc = {"doc_id": i, "text": doc}
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            raise invalid(f"documents[{i}] must be a string or an object with a string 'text'")
        docs.append(doc)
    return tuple(docs) or None


def parse_chat(obj: Any, limits: Limits) -> ChatRequest:
    f = Fields(obj, "", CHAT)
    fmt = response_format(f.get("response_format"))
    tools = declared_tools(f.get("tools"))
    calls_constraint, calls = tool_constraint(tools, f.get("tool_choice"), f.bool("parallel_tool_calls"))
    if fmt is not None and calls:
        raise invalid("response_format json_object / json_schema and tools can not both shape one answer: send "
                      "tool_choice \"none\" for a JSON answer, or drop response_format to call tools")
    values = _common(f, limits, ("max_completion_tokens", "max_tokens"))
    logprobs = bool(f.bool("logprobs"))
    top = f.int("top_logprobs", 0, MAX_TOP_N) or 0
    if top and not logprobs:
        raise invalid("top_logprobs requires logprobs=true")
    values.update(logprobs=logprobs, top_n_tokens=top)
    stream, include_usage = _stream(f)
    n, best_of = rows(f, limits, stream, best_of=False)
    return ChatRequest(
        messages=_messages(obj.get("messages")), params=sampling_params(limits, values),
        tools=tools or None, documents=_documents(obj.get("documents")),
        stream=stream, include_usage=include_usage, logprobs=logprobs, top_logprobs=top, model=obj.get("model"),
        constraint=fmt or calls_constraint, calls=calls,
        n=n, best_of=best_of,
    )


def parse_completion(obj: Any, limits: Limits) -> CompletionRequest:
    f = Fields(obj, "", COMPLETION)
    f.null_or("suffix", (), "suffix (fill-in-the-middle) is not implemented")
    raw = obj.get("prompt")
    prompts = raw if isinstance(raw, list) else [raw]
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise invalid("prompt must be a non-empty string or a non-empty list of non-empty strings")
    values = _common(f, limits, ("max_tokens",))
    logprobs = f.int("logprobs", 0, MAX_TOP_N)
    values.update(logprobs=logprobs is not None, top_n_tokens=logprobs or 0)
    stream, include_usage = _stream(f)
    if stream and len(prompts) > 1:
        raise invalid("stream=true takes a single prompt")
    n, best_of = rows(f, limits, stream, best_of=True)
    return CompletionRequest(
        prompts=tuple(prompts), params=sampling_params(limits, values), stream=stream,
        include_usage=include_usage, echo=bool(f.bool("echo")), logprobs=logprobs, model=obj.get("model"),
        constraint=response_format(f.get("response_format")),
        n=n, best_of=best_of,
    )


def may_sample(obj: dict, defaults: Mapping[str, Any]) -> bool:
    """Whether a chat or completions body, under a batch job's default parameters, samples: OpenAI samples at
    temperature 1 unless told 0; the body's temperature, else the job's, decides (a temperature that is not a
    number counts as sampling: the parser refuses the body anyway)."""
    t = obj.get("temperature", defaults.get("temperature", 1.0))
    return not isinstance(t, (int, float)) or t > 0
