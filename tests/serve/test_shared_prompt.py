"""A long system prompt (+ tools) shared by different users' chat requests, through the Flask app and the real
engine on the tiny checkpoint: the first request leaves a snapshot where the system part ends, the second (another
question) resumes there: usage.prompt_tokens_details.cached_tokens == the system part's tokens, and its greedy
answer is the one a full prefill gives."""

from __future__ import annotations

import json

import pytest

from serve.prompts import system_boundary
from tests.server_helpers import ready_app

ENV = {"MAX_CONCURRENT_SEQS": "2", "MAX_QUEUED_REQUESTS": "4", "MAX_INPUT_TOKENS": "1500", "MAX_TOTAL_TOKENS": "1600",
       "MAX_NEW_TOKENS": "6", "DEVICE": "cpu"}
SYSTEM = "You are a careful assistant for a weather service. Answer briefly and cite the tool you used. " * 6
TOOLS = [{"type": "function", "function": {"name": f"tool_{i}", "description": f"Tool number {i} of the service",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
         for i in range(4)]


@pytest.fixture(scope="module")
def served(tiny_ckpt):
    app, client, engine = ready_app(tiny_ckpt, ENV)
    yield client, engine
    engine.shutdown(timeout=5)


def ask(client, question, system=SYSTEM, tools=TOOLS):
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "tools": tools, "max_tokens": 6,
                                                  "temperature": 0})
    assert r.status_code == 200, r.get_json()
    out = r.get_json()
    return out["usage"], out["choices"][0]["message"]


def boundary(engine, question, system=SYSTEM):
    """(the server's boundary for this request, the system turn's ids alone, the prompt's ids)."""
    from serve.prompts import Ctx, chat_prompt
    from serve.protocol import Limits
    from serve.protocol.openai import parse_chat

    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    # as the Flask test client sends it (its JSON sorts keys: the tools render in that order)
    req = parse_chat(json.loads(json.dumps({"messages": messages, "tools": TOOLS}, sort_keys=True)), Limits())
    ids = chat_prompt(Ctx(engine, "tiny"), req)
    tok, tools = engine.tokenizer, [dict(t) for t in req.tools]
    text = tok.render_chat(messages, tools=tools)
    assert tok.encode(text) == list(ids)
    assert system_boundary(tok, messages, tools, None, text, ids) == ids.snapshot_at[0]
    alone = tok.encode(tok.render_chat(messages[:1], tools=tools, add_generation_prompt=False))
    return ids.snapshot_at[0], alone, list(ids)


def test_second_user_resumes_at_the_end_of_the_shared_system_part(served):
    client, engine = served
    engine.clear_prefix_cache()
    cut, alone, ids = boundary(engine, "What is the weather in Lisbon today?")
    # the system turn's own ids, then the next turn's role marker: every request with this system part starts so
    assert ids[:len(alone)] == alone and len(alone) >= 256 and cut > len(alone) and cut - len(alone) <= 8
    first, _ = ask(client, "What is the weather in Lisbon today?")
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    usage, answer = ask(client, "And in Porto, tomorrow morning?")
    assert boundary(engine, "And in Porto, tomorrow morning?")[0] == cut  # the same for every question
    assert usage["prompt_tokens_details"]["cached_tokens"] == cut
    assert engine.stats()["prefix_cache"]["snapshots_boundary"] == 1
    engine.clear_prefix_cache()
    fresh_usage, fresh = ask(client, "And in Porto, tomorrow morning?")  # nothing cached: a full prefill
    assert fresh_usage["prompt_tokens_details"]["cached_tokens"] == 0 and fresh == answer


def test_a_short_system_part_gets_no_boundary_snapshot(served):
    client, engine = served
    engine.clear_prefix_cache()
    before = engine.stats()["prefix_cache"]["snapshots_boundary"]
    ask(client, "Hello there", system="Be brief.", tools=None)
    usage, _ = ask(client, "Another question", system="Be brief.", tools=None)
    assert engine.stats()["prefix_cache"]["snapshots_boundary"] == before  # SNAPSHOT_BOUNDARY_TOKENS=256
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
