"""serve/protocol/toolcalls.py: Granite `<tool_call>` text -> OpenAI tool_calls, streamed and whole.

The property: however the generated text is cut into token texts, the streamed deltas concatenate to exactly
the non-streamed answer (content, each call's name and arguments), and arguments come back once-decoded."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve.protocol.toolcalls import TOOL_CLOSE, TOOL_OPEN, ToolCallParser, parse_tool_calls


def stream(pieces):
    """Feed pieces; -> (content, [(id, name, arguments)], complete, deltas) rebuilt from the deltas alone."""
    p = ToolCallParser()
    deltas = [d for piece in pieces for d in p.push(piece)] + p.finish()
    content, calls = "", {}
    for d in deltas:
        assert set(d) <= {"content", "tool_calls"} and len(d) == 1
        content += d.get("content", "")
        for tc in d.get("tool_calls", []):
            i = tc["index"]
            if i not in calls:  # the first delta of a call: its id, type and name
                assert i == len(calls) and tc["type"] == "function" and tc["id"].startswith("call_")
                calls[i] = [tc["id"], tc["function"]["name"], tc["function"]["arguments"]]
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                calls[i][2] += tc["function"]["arguments"]
    assert content == p.content
    assert [tuple(c) for c in calls.values()] == [(c["id"], c["function"]["name"], c["function"]["arguments"])
                                                  for c in p.calls]
    return content, [tuple(c[1:]) for c in calls.values()], p.complete, deltas


def names_args(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def cut(text, points):
    bounds = sorted({0, len(text), *(p % (len(text) + 1) for p in points)})
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


# ---- whole texts ----

def test_single_and_parallel_calls_in_the_template_format():
    text = ('Let me check.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "b", "arguments": {"y": "é"}}\n</tool_call>')
    content, calls, complete = parse_tool_calls(text)
    assert content == "Let me check." and complete
    assert names_args(calls) == [("a", {"x": 1}), ("b", {"y": "é"})]
    assert calls[0]["function"]["arguments"] == '{"x": 1}'  # as the model wrote it, not re-encoded
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2


def test_escaped_string_arguments_are_decoded_once():
    inner = {"x": [1, 2], "q": 'say "hi"\n', "e": "é😀"}
    text = TOOL_OPEN + json.dumps({"name": "a", "arguments": json.dumps(inner)}) + TOOL_CLOSE
    _, calls, complete = parse_tool_calls(text)
    assert complete and names_args(calls) == [("a", inner)]
    assert isinstance(json.loads(calls[0]["function"]["arguments"]), dict)  # an object, not a JSON string again


def test_list_form_other_key_orders_and_unterminated():
    _, calls, _ = parse_tool_calls('<tool_call>[{"name": "a", "arguments": {}}, {"name": "b"}]</tool_call>')
    assert names_args(calls) == [("a", {}), ("b", {})]
    _, calls, _ = parse_tool_calls('<tool_call>{"arguments": {"k": 1}, "name": "z"}</tool_call>')
    assert names_args(calls) == [("z", {"k": 1})]
    content, calls, complete = parse_tool_calls('ok <tool_call>\n{"name": "a", "arguments": {"q": 2}}')
    assert content == "ok" and names_args(calls) == [("a", {"q": 2})] and complete


def test_a_cut_call_keeps_what_was_generated_and_is_incomplete():
    content, calls, complete = parse_tool_calls('ok <tool_call>\n{"name": "a", "arguments": {"q": [1, ')
    assert content == "ok" and not complete
    assert calls[0]["function"] == {"name": "a", "arguments": '{"q": [1, '}
    # a whole call before the cut one is kept whole
    _, calls, complete = parse_tool_calls('<tool_call>{"name": "a", "arguments": {}}</tool_call>'
                                          '<tool_call>{"name": "b", "arguments": {"s": "x')
    assert [c["function"]["arguments"] for c in calls] == ["{}", '{"s": "x'] and not complete


def test_markup_in_strings_and_braces_do_not_end_arguments():
    args = {"s": "}</tool_call><tool_call>{", "n": {"deep": [{"x": "]"}]}}
    text = f'<tool_call>\n{{"name": "f", "arguments": {json.dumps(args)}}}\n</tool_call>'
    _, calls, complete = parse_tool_calls(text)
    assert complete and names_args(calls) == [("f", args)]


@pytest.mark.parametrize("text", [
    "no calls at all",
    "  spaces are kept when there is no call  ",
    "<tool_call>{not json}</tool_call>",
    '<tool_call>{"arguments": {}}</tool_call>',
    '<tool_call>\n{"name": "a", "argum',
    "a <toy> b",
    "ends with <tool_c",
])
def test_text_that_is_not_a_call_stays_content(text):
    assert parse_tool_calls(text) == (text, [], True)
    assert stream(list(text))[:3] == (text, [], True)


def test_a_broken_block_does_not_swallow_the_next():
    content, calls, _ = parse_tool_calls('<tool_call>{broken <tool_call>{"name": "ok", "arguments": {}}</tool_call>')
    assert names_args(calls) == [("ok", {})] and content == "<tool_call>{broken"


def test_arguments_stream_as_they_are_generated():
    """Not one blob at the end: each token of the arguments is sent when it arrives."""
    pieces = ["<tool_call>", "\n", '{"name": "get_weather", ', '"arguments": {', '"city": ', '"Par', 'is"', "}}",
              "\n", "</tool_call>"]
    p = ToolCallParser()
    per_push = [p.push(x) for x in pieces]
    assert per_push[2] == []  # the name is not known until "arguments" follows it
    first = per_push[3][0]["tool_calls"][0]
    assert first["function"] == {"name": "get_weather", "arguments": ""} and first["index"] == 0
    args = [d["tool_calls"][0]["function"]["arguments"] for batch in per_push[3:] for d in batch
            if "tool_calls" in d and "id" not in d["tool_calls"][0]]
    assert args == ["{", '"city": ', '"Par', 'is"', "}"]


# ---- streamed == non-streamed, for any cut ----

KEY = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=6)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), KEY,
                   st.floats(allow_nan=False, allow_infinity=False, width=32))
ARGS = st.dictionaries(KEY, st.recursive(SCALAR, lambda c: st.lists(c, max_size=3) | st.dictionaries(KEY, c, max_size=3),
                                         max_leaves=6), max_size=4)
NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=12)
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12).filter(lambda t: "<tool_call" not in t)


@st.composite
def generation(draw):
    """(text, content pieces, [(name, args)]): free text and calls the way a model may write them."""
    parts, calls = [], []
    for _ in range(draw(st.integers(0, 3))):
        parts.append(draw(TEXT))
        name, args = draw(NAME), draw(ARGS)
        as_string = draw(st.booleans())
        sep = draw(st.sampled_from(["\n", "", " "]))
        value = json.dumps(json.dumps(args) if as_string else args, ensure_ascii=draw(st.booleans()))
        parts.append(f'{TOOL_OPEN}{sep}{{"name": {json.dumps(name)}, "arguments": {value}}}{sep}{TOOL_CLOSE}')
        calls.append((name, args))
    parts.append(draw(TEXT))
    return "".join(parts), calls


@settings(max_examples=300, deadline=None)
@given(gen=generation(), points=st.lists(st.integers(0, 10_000), max_size=30))
def test_streamed_concatenation_equals_the_non_streamed_answer(gen, points):
    text, expected = gen
    content, calls, complete = parse_tool_calls(text)
    s_content, s_calls, s_complete, _ = stream(cut(text, points))
    assert (s_content, s_calls, s_complete) == (content, [(c["function"]["name"], c["function"]["arguments"])
                                                          for c in calls], complete)
    assert complete
    assert [(n, json.loads(a)) for n, a in s_calls] == expected  # never double-encoded, nothing lost
    assert TOOL_OPEN not in content and TOOL_CLOSE not in content


@settings(max_examples=200, deadline=None)
@given(gen=generation(), keep=st.integers(0, 10_000), points=st.lists(st.integers(0, 10_000), max_size=20))
def test_a_text_cut_anywhere_streams_as_it_parses(gen, keep, points):
    """max_tokens or a stop string may end the text anywhere, even inside a call or an escape."""
    text = gen[0][:keep % (len(gen[0]) + 1)]
    content, calls, complete = parse_tool_calls(text)
    s_content, s_calls, s_complete, _ = stream(cut(text, points))
    assert (s_content, s_calls, s_complete) == (content, [(c["function"]["name"], c["function"]["arguments"])
                                                          for c in calls], complete)
    whole = [c for c in (calls if complete else calls[:-1])]
    assert all(isinstance(json.loads(c["function"]["arguments"]), dict) for c in whole)
