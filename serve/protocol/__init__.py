"""Request parsing and validation (torch-free): body -> JSON -> a typed request with SamplingParams.

    fields.py     body decoding, typed field access, Limits, ProtocolError (what every shape shares)
    tgi.py        Hugging Face TGI `{"inputs", "parameters", "stream"}`
    openai.py     OpenAI chat completions `{"messages", ...}` and completions `{"prompt", ...}`
    constraints.py  response_format / tool_choice / TGI grammar -> model/types.py Constraint (structured output)
    toolcalls.py  Granite `<tool_call>` output -> OpenAI `tool_calls`, incrementally (what the chat shape returns)

The table of request kinds, which picks a shape's parser for a body, is serve/kinds.
"""

from __future__ import annotations

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

__all__ = [
    "JSON_TYPES", "JSONL_TYPES", "ChatRequest", "CompletionRequest", "Limits", "ProtocolError", "TextRequest",
    "decode_json", "invalid", "media_type", "parse_chat", "parse_completion", "parse_tgi", "split_lines",
    "tgi_params",
]
