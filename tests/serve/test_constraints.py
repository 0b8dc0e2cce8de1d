"""Structured-output request fields -> model/types.py Constraint (serve/protocol/constraints.py), through the
parsers the server runs: OpenAI chat response_format / tool_choice / parallel_tool_calls, completions
response_format, TGI parameters.grammar; and each bad input's 422 naming the problem."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.types import Constraint, ToolSpec
from serve.kinds import parse_request
from serve.protocol import Limits, ProtocolError
from serve.protocol.constraints import MAX_GRAMMAR_CHARS

LIMITS = Limits(default_max_new_tokens=20, max_new_tokens=100)
MSGS = [{"role": "user", "content": "x"}]
SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}, "required": ["a"]}
CANON = json.dumps(SCHEMA, sort_keys=True)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "d", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def chat(**kw):
    return parse_request({"messages": MSGS, **kw}, LIMITS, "chat")


def refused(obj, kind=None):
    with pytest.raises(ProtocolError) as err:
        parse_request(obj, LIMITS, kind)
    assert err.value.status == 422
    return err.value.message


# ---- OpenAI response_format ----

def test_response_format_shapes():
    assert chat().constraint is None
    assert chat(response_format={"type": "text"}).constraint is None
    assert chat(response_format={"type": "json_object"}).constraint == Constraint("json", "")
    c = chat(response_format={"type": "json_schema", "json_schema": {"name": "m", "schema": SCHEMA, "strict": True,
                                                                      "description": "d"}}).constraint
    assert c == Constraint("json", CANON)  # canonical: key order does not split the grammar cache
    reordered = dict(reversed(list(SCHEMA.items())))
    assert chat(response_format={"type": "json_schema", "json_schema": {"name": "m", "schema": reordered}}
                ).constraint == c
    assert chat(response_format={"type": "json_schema", "json_schema": {"name": "m"}}).constraint.value == ""


def test_completions_take_response_format():
    req = parse_request({"prompt": "p", "response_format": {"type": "json_schema", "json_schema": {
        "name": "m", "schema": SCHEMA}}}, LIMITS, "completion")
    assert req.constraint == Constraint("json", CANON)
    assert parse_request({"prompt": "p"}, LIMITS, "completion").constraint is None


# ---- OpenAI tool_choice ----

def test_tool_choice_modes():
    spec = ToolSpec("get_weather", json.dumps(WEATHER["function"]["parameters"], sort_keys=True))
    auto = chat(tools=[WEATHER, TIME])
    assert auto.calls and auto.constraint == Constraint("tool_calls", tools=(spec, ToolSpec("get_time", "{}")),
                                                        tool_mode="auto", parallel=True)
    req = chat(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    assert req.calls and req.constraint.tool_mode == "required" and not req.constraint.parallel
    assert len(req.constraint.tools) == 2
    named = chat(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.constraint == Constraint("tool_calls", tools=(spec,), tool_mode="required", parallel=True)
    assert [t["function"]["name"] for t in named.tools] == ["get_weather", "get_time"]  # the template lists all
    none = chat(tools=[WEATHER], tool_choice="none")
    assert none.constraint is None and not none.calls and none.tools  # the model knows them, may not call
    assert chat(tool_choice="auto").constraint is None and not chat(tool_choice="auto").calls
    assert chat(tools=[WEATHER], tool_choice="none", response_format={"type": "json_object"}).constraint.kind == "json"


@pytest.mark.parametrize("kw,needle", [
    ({"response_format": {"type": "xml"}}, "response_format.type must be text, json_object or json_schema"),
    ({"response_format": "json"}, "response_format must be an object"),
    ({"response_format": {"type": "json_object", "schema": {}}}, "unknown parameter(s) in response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA, "extra": 1}}}, "extra"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": "not json"}}}, "is a string but not JSON"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1, 2]}}}, "must be a JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "integr"}}}},
     "response_format.json_schema.schema.type must be one of"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}}, "schema.properties.a.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": [{"a": 1}]}}}}, "schema.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"required": "a"}}}}, "required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"anyOf": []}}}}, "anyOf"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"maxItems": -1}}}}, "maxItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": False}}}, "no output can match"),
    ({"response_format": {"type": "json_schema", "json_schema": {"strict": "yes", "schema": {}}}}, "strict"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {
        "type": "object", "properties": {"a": {"type": "string", "description": "x" * MAX_GRAMMAR_CHARS}}}}}},
     f"at most {MAX_GRAMMAR_CHARS}"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_wether"}}},
     "names function 'get_wether', which is not in tools (declared: get_weather)"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice must be"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice must be"),
    ({"tools": [WEATHER, WEATHER]}, "declared twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
     "tools[0].function.parameters must be a JSON schema"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "tool_choice \"none\""),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_chat_bad_structured_fields_are_422(kw, needle):
    assert needle in refused({"messages": MSGS, **kw}, "chat")


# ---- TGI parameters.grammar (on /invocations, and each JSON Lines / batch record) ----

def tgi(grammar):
    return parse_request({"inputs": "x", "parameters": {"grammar": grammar}}, LIMITS)


def test_tgi_grammar_shapes():
    assert tgi({"type": "json", "value": SCHEMA}).constraint == Constraint("json", CANON)
    assert tgi({"type": "json", "value": json.dumps(SCHEMA)}).constraint == Constraint("json", CANON)  # JSON text
    assert tgi({"type": "json_schema", "value": {"name": "m", "schema": SCHEMA}}).constraint == Constraint("json", CANON)
    assert tgi({"type": "regex", "value": "[a-z]{3}"}).constraint == Constraint("regex", "[a-z]{3}")
    assert tgi(None).constraint is None
    batch = parse_request({"inputs": ["a", "b"], "parameters": {"grammar": {"type": "regex", "value": "x+"}}}, LIMITS)
    assert batch.constraint == Constraint("regex", "x+") and len(batch.inputs) == 2  # every input's output


@pytest.mark.parametrize("grammar,needle", [
    ({"type": "lark", "value": "start: x"}, "parameters.grammar.type must be json, regex or json_schema"),
    ({"type": "json"}, "parameters.grammar.value must be a JSON schema"),
    ({"type": "json", "value": "{nope"}, "parameters.grammar.value is a string but not JSON"),
    ({"type": "json", "value": 5}, "parameters.grammar.value must be a JSON schema"),
    ({"type": "regex", "value": ""}, "non-empty regular expression"),
    ({"type": "regex", "value": ["a"]}, "non-empty regular expression"),
    ({"type": "regex", "value": "a" * (MAX_GRAMMAR_CHARS + 1)}, f"at most {MAX_GRAMMAR_CHARS}"),
    ({"type": "regex", "value": "a", "flags": "i"}, "unknown parameter(s) in parameters.grammar: flags"),
    ({"type": "json_schema", "value": SCHEMA}, "for type json_schema"),
    ("json", "parameters.grammar must be an object"),
])
def test_tgi_bad_grammar_is_422(grammar, needle):
    assert needle in refused({"inputs": "x", "parameters": {"grammar": grammar}})


def test_grammar_cannot_be_a_batch_job_default():
    from serve.batch.cli import sampling_values

    with pytest.raises(SystemExit, match="grammar cannot be a job default"):
        sampling_values({"grammar": {"type": "regex", "value": "x"}})


# ---- history: a call's arguments round-trip, never double-encoded ----

@pytest.mark.parametrize("arguments,expected", [
    ('{"city": "Paris"}', {"city": "Paris"}),
    ({"city": "Paris"}, {"city": "Paris"}),
    ("", {}),
    (None, {}),
    ("not json", '"not json"'),  # stays a JSON string, so the rendered call is still JSON
    ('"a string"', '"a string"'),
])
def test_history_call_arguments(arguments, expected):
    msgs = [*MSGS, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "content": "20 C", "tool_call_id": "c1"}]
    req = chat(messages=msgs)
    got = req.messages[1]["tool_calls"][0]["function"]["arguments"]
    assert got == expected
    if isinstance(got, str):
        json.loads(got)


def test_history_call_arguments_of_another_type_are_422():
    msgs = [*MSGS, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": 5}}]}]
    assert "messages[1].tool_calls[0].function.arguments" in refused({"messages": msgs}, "chat")


# ---- any JSON in these fields: a Constraint or a 422, never another exception ----

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=6),
                     st.sampled_from(["json", "regex", "json_schema", "json_object", "text", "function", "object",
                                      "string", "required", "auto", "none", "get_weather"]))
_keys = st.sampled_from(["type", "value", "schema", "json_schema", "name", "function", "properties", "items",
                         "required", "anyOf", "enum", "parameters", "maxItems", "$ref", "strict", "x"])
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=4),
                     max_leaves=16)


@settings(max_examples=400, deadline=None)
@given(fmt=_json, tools=_json, choice=_json, parallel=_json, grammar=_json)
def test_any_json_in_the_structured_fields_is_a_constraint_or_a_422(fmt, tools, choice, parallel, grammar):
    for obj, kind in (({"messages": MSGS, "response_format": fmt, "tools": tools, "tool_choice": choice,
                        "parallel_tool_calls": parallel}, "chat"),
                      ({"prompt": "p", "response_format": fmt}, "completion"),
                      ({"inputs": "p", "parameters": {"grammar": grammar}}, None)):
        try:
            req = parse_request(obj, LIMITS, kind)
        except ProtocolError as e:
            assert e.status == 422 and e.message
            continue
        assert req.constraint is None or isinstance(req.constraint, Constraint)
