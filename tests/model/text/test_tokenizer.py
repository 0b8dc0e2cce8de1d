import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.text.detok import PrefixDetokenizer
from model.text.tokenizer import Tokenizer
from serve.protocol.toolcalls import parse_tool_calls

SOR, EOR, EOT = "<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return Tokenizer.from_dir(tiny_ckpt)


def _turns(text):
    """[(role, content)] of a rendered prompt; the trailing generation prompt is role 'assistant', None."""
    out = []
    for chunk in text.split(SOR)[1:]:
        role, rest = chunk.split(EOR, 1)
        if rest.endswith(EOT + "\n"):
            out.append((role, rest[: -len(EOT) - 1]))
        else:
            assert rest == "", f"unterminated turn {chunk!r}"
            out.append((role, None))
    return out


def test_ids_and_specials(tok):
    assert tok.eos_token_id == tok.encode(EOT)[0] and len(tok.encode(EOT)) == 1
    assert tok.pad_token_id == tok.encode("<|pad|>")[0] != tok.eos_token_id
    assert tok.is_special(tok.eos_token_id) and tok.is_special(tok.encode(SOR)[0])
    call_id = tok.encode("<tool_call>")
    assert len(call_id) == 1 and not tok.is_special(call_id[0])
    assert not tok.is_special(tok.encode("a")[0])
    assert tok.vocab_size == 512


@pytest.mark.parametrize("text", ["", "plain words", "Café naïve 東京 😀👍🏽 مرحبا", "tabs\tand\nnewlines  ", "\x00\x7f"])
def test_round_trip_examples(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_round_trip_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_skip_special_tokens_keeps_tool_markers(tok):
    ids = tok.encode(f"{SOR}assistant{EOR}<tool_call>x</tool_call>{EOT}")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant<tool_call>x</tool_call>"


def _stream(detok, ids):
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.finish())
    return pieces


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 511), max_size=40), skip=st.booleans())
def test_streaming_equals_full_decode(tok, ids, skip):
    d = tok.detokenizer(skip_special_tokens=skip)
    pieces = _stream(d, ids)
    assert "".join(pieces) == d.text == tok.decode(ids, skip_special_tokens=skip)


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=30))
def test_streaming_real_text_never_emits_replacement_chars(tok, text):
    d = tok.detokenizer()
    pieces = _stream(d, tok.encode(text.replace("\ufffd", "")))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text.replace("\ufffd", "")


def test_multibyte_character_waits_for_its_last_byte(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1  # the tiny vocab splits the emoji into byte tokens
    d = tok.detokenizer()
    assert [d.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert d.push(ids[-1]) == "😀"
    cut = tok.detokenizer()
    assert "".join(cut.push(i) for i in ids[:-1]) == ""
    assert cut.finish() == "\ufffd"  # a truly incomplete character at the end


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_prefix_detokenizer_fallback_matches_full_decode(tok, text):
    # The fallback for tokenizers that are not byte-level, checked on valid text.
    text = text.replace("\ufffd", "")
    d = PrefixDetokenizer(lambda xs: tok.decode(xs))
    pieces = _stream(d, tok.encode(text))
    assert "".join(pieces) == d.text == text
    assert all("\ufffd" not in p for p in pieces)


# --- chat template -------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_default_system_prompt_and_generation_prompt(tok):
    text = tok.render_chat([{"role": "user", "content": "Hi there"}])
    turns = _turns(text)
    assert [r for r, _ in turns] == ["system", "user", "assistant"]
    assert turns[0][1] and "helpful" in turns[0][1]
    assert turns[1][1] == "Hi there" and turns[2][1] is None
    assert text.endswith(f"{SOR}assistant{EOR}")
    no_gen = tok.render_chat([{"role": "user", "content": "Hi there"}], add_generation_prompt=False)
    assert no_gen.endswith(EOT + "\n") and text.startswith(no_gen)


def test_explicit_system_and_multi_turn(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": [{"type": "text", "text": "c"}]}]
    turns = _turns(tok.render_chat(msgs))
    assert turns == [("system", "Be brief."), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", None)]


def test_tools_and_documents_go_in_the_system_turn(tok):
    docs = [{"doc_id": 1, "title": "Paris", "text": "Paris is in France."}]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}]
    system = _turns(tok.render_chat(msgs, tools=TOOLS, documents=docs))[0][1]
    assert system.startswith("Be brief.")
    (tools_block,) = re.findall(r"<tools>\n(.+?)\n</tools>", system, re.DOTALL)
    assert [json.loads(line) for line in tools_block.splitlines()] == TOOLS
    (docs_block,) = re.findall(r"<documents>\n(.+?)\n</documents>", system, re.DOTALL)
    assert [json.loads(line) for line in docs_block.splitlines()] == docs
    assert "<tool_call>" in system  # the instructions show the call format
    only_tools = _turns(tok.render_chat([{"role": "user", "content": "x"}], tools=TOOLS))[0][1]
    assert "<tools>" in only_tools and "<documents>" not in only_tools


def test_tool_calls_and_responses_round_trip(tok):
    msgs = [
        {"role": "user", "content": "Weather in Paris and Lima?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}},
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": "20 C"},
        {"role": "tool", "tool_call_id": "c2", "content": {"temp_c": 25}},
    ]
    turns = _turns(tok.render_chat(msgs, tools=TOOLS))
    assert [r for r, _ in turns] == ["system", "user", "assistant", "user", "assistant"]
    content, calls, complete = parse_tool_calls(turns[2][1])
    assert content == "" and complete
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Lima"})]
    responses = turns[3][1]
    assert responses.count("<tool_response>") == 2  # consecutive tool results share one user turn
    blocks = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", responses, re.DOTALL)
    assert blocks[0] == "20 C" and json.loads(blocks[1]) == {"temp_c": 25}


# tool-call parsing itself: tests/serve/test_toolcalls.py
