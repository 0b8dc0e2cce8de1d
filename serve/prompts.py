"""A request's context and its prompts as token ids (torch-free): what every request kind starts from.

    Ctx                       the engine, the model's name and the metrics one request runs with
    encode_prompt(ctx, text)  text -> ids; inside a session, continuing the session's conversation
    chat_prompt(ctx, req)     messages -> the checkpoint's chat template -> ids; inside a session, its messages first;
                              the ids carry where the system part ends (PromptIds.snapshot_at: system_boundary)
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


class PromptIds(tuple):
    """A prompt's token ids (a tuple) that also carry the positions worth a state snapshot of their own
    (GenerationRequest.snapshot_at; serve/generate.py passes them on). A plain tuple of ids has none."""

    snapshot_at: tuple[int, ...] = ()


def chat_prompt(ctx: Ctx, req: ChatRequest) -> tuple[int, ...]:
    """Token ids of the rendered conversation (inside a session: its messages, then these), carrying where its
    system part ends (PromptIds.snapshot_at)."""
    tokenizer = _ready_tokenizer(ctx)
    messages = [dict(m) for m in req.messages]
    turn = current_turn()
    if turn is not None:
        messages = turn.chat_messages(messages)
    tools = [dict(t) for t in req.tools] if req.tools else None
    documents = [dict(d) for d in req.documents] if req.documents else None
    try:
        text = tokenizer.render_chat(messages, tools=tools, documents=documents)
    except Exception as e:  # the template rejects this conversation (jinja raise_exception, bad shapes)
        raise ProtocolError(422, f"the chat template cannot render these messages: {e}"[:300]) from None
    ids = PromptIds(encode_prompt(ctx, text, continued=False))
    end = system_boundary(tokenizer, messages, tools, documents, text, ids)
    ids.snapshot_at = (end,) if end else ()
    return ids


def system_boundary(tokenizer: PromptTokenizer, messages, tools, documents, text: str, ids) -> int:
    """Tokens of `ids` (the rendered conversation `text`) that its system part (leading system messages, tools,
    documents) and the opening of the next turn render to, whatever that turn says: the prompt of every request
    with the same system part starts with exactly these ids, so a snapshot there serves them all. 0: none found.

    The template renders the system part and the first other message with its content swapped for another;
    where that text and the whole text part ways is the boundary in characters. That text is tokenized on its own and
    only the ids on which both tokenizations agree count (a token that merges across the join is left out)."""
    k = next((i for i, m in enumerate(messages) if m.get("role") != "system"), len(messages))
    if k == len(messages):
        return 0  # nothing follows the system part
    first = messages[k]
    other = {**first, "content": "" if first.get("content") else "."}
    try:
        alt = tokenizer.render_chat([*messages[:k], other], tools=tools, documents=documents)
    except Exception:  # a template that refuses the swapped turn: no boundary, the prompt runs as before
        return 0
    n = next((i for i, (a, b) in enumerate(zip(alt, text, strict=False)) if a != b), min(len(alt), len(text)))
    try:
        part = tokenizer.encode(text[:n])
    except Exception:
        return 0
    j = next((i for i, (a, b) in enumerate(zip(part, ids, strict=False)) if a != b), min(len(part), len(ids)))
    # the last agreed token may still merge with what follows in another prompt unless both tokenizations end
    # on it: kept only when the whole part agreed
    return j if j == len(part) else max(j - 1, 0)


def response_id(prefix: str) -> tuple[str, int]:
    """(id, created) of an OpenAI response: `<prefix>-<random hex>` and the clock in whole seconds."""
    return f"{prefix}-{uuid.uuid4().hex}", int(time.time())
