"""A request's context and its prompts as token ids (torch-free): what every request kind starts from.

    Ctx                       the engine, the model's name and the metrics one request runs with
    encode_prompt(ctx, text)  text -> ids; inside a session, continuing the session's conversation
    chat_prompt(ctx, req)     messages -> the checkpoint's chat template -> ids; inside a session, its messages first
    response_id(prefix)       an OpenAI response's id and creation time
Either raises EngineNotReady before the engine is loaded, and ProtocolError 422 for input the tokenizer
or the template cannot take (the client's problem, not a 500).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from model.types import EngineNotReady
from serve.engine_client import EngineClient, PromptTokenizer
from serve.metrics import Metrics
from serve.protocol import ChatRequest, ProtocolError
from serve.sessions import current_turn


@dataclass
class Ctx:
    engine: EngineClient
    model_name: str
    metrics: Metrics | None = None


def _ready_tokenizer(ctx: Ctx) -> PromptTokenizer:
    tokenizer = ctx.engine.tokenizer
    if not ctx.engine.ready or tokenizer is None:
        raise EngineNotReady(ctx.engine.error or "the model is not ready")
    return tokenizer


def encode_prompt(ctx: Ctx, text: str, truncate: int | None = None, continued: bool = True) -> tuple[int, ...]:
    """Token ids of a prompt; inside a session (`continued`) they continue the session's conversation."""
    tokenizer = _ready_tokenizer(ctx)
    try:
        ids = tokenizer.encode(text)
    except Exception as e:  # input the tokenizer cannot take is the client's problem, not a 500
        raise ProtocolError(422, f"the prompt cannot be tokenized: {type(e).__name__}") from None
    ids = tuple(ids[-truncate:] if truncate else ids)
    turn = current_turn()
    return turn.continue_ids(ids) if turn is not None and continued else ids


def chat_prompt(ctx: Ctx, req: ChatRequest) -> tuple[int, ...]:
    """Token ids of the rendered conversation (inside a session: its messages, then these)."""
    tokenizer = _ready_tokenizer(ctx)
    messages = [dict(m) for m in req.messages]
    turn = current_turn()
    if turn is not None:
        messages = turn.chat_messages(messages)
    try:
        text = tokenizer.render_chat(
            messages, tools=[dict(t) for t in req.tools] if req.tools else None,
            documents=[dict(d) for d in req.documents] if req.documents else None)
    except Exception as e:  # the template rejects this conversation (jinja raise_exception, bad shapes)
        raise ProtocolError(422, f"the chat template cannot render these messages: {e}"[:300]) from None
    return encode_prompt(ctx, text, continued=False)


def response_id(prefix: str) -> tuple[str, int]:
    """(id, created) of an OpenAI response: `<prefix>-<random hex>` and the clock in whole seconds."""
    return f"{prefix}-{uuid.uuid4().hex}", int(time.time())
