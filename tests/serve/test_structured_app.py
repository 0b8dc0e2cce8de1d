"""Structured-output requests through the Flask app and the real engine on the tiny checkpoint: each request shape
hands the engine its Constraint (JSON, streamed, JSON Lines records), and every bad input is a JSON error naming
the problem while the server keeps serving. Outputs under a real grammar: tests/serve/test_structured_clients.py."""

from __future__ import annotations

import json

import pytest

from model.types import Constraint
from tests.fakes import wait_free
from tests.server_helpers import ready_app

ENV = {"MAX_CONCURRENT_SEQS": "4", "MAX_QUEUED_REQUESTS": "8", "MAX_INPUT_TOKENS": "1000", "MAX_TOTAL_TOKENS": "1100",
       "MAX_NEW_TOKENS": "4", "DEVICE": "cpu"}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}
CANON = json.dumps(SCHEMA, sort_keys=True)
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}
MSGS = [{"role": "user", "content": "weather in Paris?"}]


@pytest.fixture(scope="module")
def served(tiny_ckpt):
    app, client, engine = ready_app(tiny_ckpt, ENV)
    seen = []
    submit = engine.submit

    def recording(request):
        seen.append(request)
        return submit(request)

    engine.submit = recording
    yield client, engine, seen
    engine.shutdown(timeout=5)


def constraints_of(seen, call):
    del seen[:]
    r = call()
    assert r.status_code == 200, r.data
    return r, [q.constraint for q in seen]


@pytest.mark.parametrize("path,body,expected", [
    ("/v1/chat/completions", {"messages": MSGS, "response_format": {"type": "json_object"}}, Constraint("json", "")),
    ("/invocations", {"messages": MSGS, "response_format": {"type": "json_schema", "json_schema": {
        "name": "w", "schema": SCHEMA}}}, Constraint("json", CANON)),
    ("/v1/completions", {"prompt": "p", "response_format": {"type": "json_object"}}, Constraint("json", "")),
    ("/invocations", {"inputs": "p", "parameters": {"grammar": {"type": "json", "value": SCHEMA}}},
     Constraint("json", CANON)),
    ("/invocations", {"inputs": "p", "parameters": {"grammar": {"type": "regex", "value": "[0-9]+"}}},
     Constraint("regex", "[0-9]+")),
])
def test_each_shape_hands_the_engine_its_constraint(served, path, body, expected):
    client, _, seen = served
    _, got = constraints_of(seen, lambda: client.post(path, json=body))
    assert got == [expected]
    _, got = constraints_of(seen, lambda: client.post(path, json={**body, "stream": True}))
    assert got == [expected]


def test_tool_choice_reaches_the_engine(served):
    client, _, seen = served
    body = {"messages": MSGS, "tools": [TOOL], "tool_choice": "required", "parallel_tool_calls": False}
    _, (c,) = constraints_of(seen, lambda: client.post("/v1/chat/completions", json=body))
    assert c.kind == "tool_calls" and c.tool_mode == "required" and not c.parallel
    assert [(t.name, json.loads(t.parameters)) for t in c.tools] == [("get_weather", SCHEMA)]
    _, (c,) = constraints_of(seen, lambda: client.post("/v1/chat/completions", json={**body, "tool_choice": "auto"}))
    assert c.tool_mode == "auto"
    _, (c,) = constraints_of(seen, lambda: client.post("/v1/chat/completions", json={**body, "tool_choice": "none"}))
    assert c is None


def test_jsonlines_records_carry_their_own_grammar(served):
    client, _, seen = served
    records = [{"inputs": "a", "parameters": {"grammar": {"type": "regex", "value": "x+"}}},
               {"inputs": "b"},
               {"inputs": "c", "parameters": {"grammar": {"type": "nope", "value": 1}}}]
    body = "".join(json.dumps(r) + "\n" for r in records)
    r, got = constraints_of(seen, lambda: client.post("/invocations", data=body, content_type="application/jsonlines"))
    assert sorted(map(repr, got)) == sorted(map(repr, [Constraint("regex", "x+"), None]))
    lines = [json.loads(x) for x in r.data.decode().splitlines()]
    assert "generated_text" in lines[0] and "generated_text" in lines[1]
    assert lines[2]["error_type"] == "validation" and "parameters.grammar.type" in lines[2]["error"]


@pytest.mark.parametrize("path,body,needle", [
    ("/v1/chat/completions", {"messages": MSGS, "tool_choice": "required"}, "needs tools"),
    ("/v1/chat/completions", {"messages": MSGS, "tools": [TOOL], "tool_choice": {
        "type": "function", "function": {"name": "get_time"}}}, "'get_time', which is not in tools"),
    ("/v1/chat/completions", {"messages": MSGS, "response_format": {"type": "yaml"}}, "response_format.type"),
    ("/v1/chat/completions", {"messages": MSGS, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objekt"}}}}, "json_schema.schema.type"),
    ("/v1/completions", {"prompt": "p", "response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
     "must be a JSON schema"),
    ("/invocations", {"inputs": "p", "parameters": {"grammar": {"type": "ebnf", "value": "x"}}}, "grammar.type"),
    ("/invocations", {"inputs": "p", "parameters": {"grammar": {"type": "regex", "value": "a" * 70000}}},
     "at most 65536"),
])
def test_bad_structured_requests_are_422_and_the_server_keeps_serving(served, path, body, needle):
    client, engine, seen = served
    del seen[:]
    r = client.post(path, json=body)
    assert r.status_code == 422 and r.get_json()["error_type"] == "validation", r.data
    assert needle in r.get_json()["error"]
    assert seen == []  # refused before the engine
    r = client.post(path, json={**body, "stream": True})
    assert r.status_code == 422 and needle in r.get_json()["error"]
    ok = client.post("/invocations", json={"inputs": "still here", "parameters": {"max_new_tokens": 2}})
    assert ok.status_code == 200 and ok.get_json()[0]["details"]["generated_tokens"] == 2
    wait_free(engine)  # every slot free again
