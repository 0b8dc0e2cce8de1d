import json

import pytest

from model.types import EngineConfig
from serve.kinds import parse_request
from serve.protocol import (
    ChatRequest,
    CompletionRequest,
    Limits,
    ProtocolError,
    TextRequest,
    decode_json,
    media_type,
    split_lines,
    tgi_params,
)

LIMITS = Limits(default_max_new_tokens=20, max_new_tokens=100)


ROUTE_KIND = {"invocations": None, "chat": "chat", "completions": "completion"}


def parse(obj, route="invocations", limits=LIMITS):
    return parse_request(obj, limits, ROUTE_KIND[route])


def error_of(obj, route="invocations"):
    with pytest.raises(ProtocolError) as err:
        parse(obj, route)
    return err.value


# ---- body decoding ----

def test_media_type():
    assert media_type("application/json; charset=utf-8") == "application/json"
    assert media_type("Application/JSONLines") == "application/jsonlines"
    assert media_type(None) == "application/json"
    assert media_type("") == "application/json"


@pytest.mark.parametrize("body", [b"{", b"\xff\xfe{}", b"", b"   ", b'{"a": NaN}', b"[Infinity]",
                                  b"[" * 100_000 + b"]" * 100_000, b"1" * 5000, b'{"inputs": "\\ud800"}',
                                  b'["\\uDFFF x"]'])
def test_bad_json_is_400(body):
    with pytest.raises(ProtocolError) as err:
        decode_json(body)
    assert err.value.status == 400 and err.value.error_type == "bad_request"


def test_surrogate_pairs_are_fine():
    assert decode_json(b'"\\ud83d\\ude00"') == "\U0001f600"


def test_split_lines_keeps_one_entry_per_line():
    assert split_lines(b'{"a":1}\n\n{"b":2}\r\n') == [b'{"a":1}', b"", b'{"b":2}']
    assert split_lines(b'"x"') == [b'"x"']
    assert split_lines(b"") == []
    # blank as decode_json sees it (str.strip): a final "\x1f" line is no record, as a final " " line is not
    assert split_lines(b"{\"a\":1}\n\x1f") == split_lines(b"{\"a\":1}\n ") == [b"{\"a\":1}"]


# ---- TGI ----

def test_tgi_defaults_are_greedy_with_server_default_length():
    req = parse({"inputs": "hello"})
    assert isinstance(req, TextRequest)
    assert req.inputs == ("hello",) and not req.batched and not req.stream
    assert req.params.max_new_tokens == 20 and req.params.greedy
    assert not req.details and not req.return_full_text and req.truncate is None


def test_tgi_full_parameter_set():
    req = parse({"inputs": ["a", "b"], "stream": False, "parameters": {
        "max_new_tokens": 7, "temperature": 0.5, "top_k": 10, "top_p": 0.9, "typical_p": 0.95, "do_sample": True,
        "seed": 42, "repetition_penalty": 1.2, "frequency_penalty": 0.5, "stop": ["\n\n", "END"], "truncate": 5,
        "return_full_text": True, "details": True, "decoder_input_details": False, "top_n_tokens": 3,
        "best_of": 1, "watermark": False, "grammar": None, "adapter_id": None}})
    p = req.params
    assert req.batched and req.inputs == ("a", "b")
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.typical_p) == (7, 0.5, 10, 0.9, 0.95)
    assert p.do_sample and p.seed == 42 and p.repetition_penalty == 1.2 and p.frequency_penalty == 0.5
    assert p.stop == ("\n\n", "END") and p.top_n_tokens == 3 and p.logprobs
    assert req.truncate == 5 and req.return_full_text and req.details


def test_tgi_sampling_knob_turns_sampling_on_like_tgi():
    assert parse({"inputs": "x", "parameters": {"temperature": 0.7}}).params.do_sample
    assert parse({"inputs": "x", "parameters": {"top_p": 0.5}}).params.do_sample
    assert not parse({"inputs": "x", "parameters": {"do_sample": False}}).params.do_sample
    assert not parse({"inputs": "x", "parameters": {"temperature": 1.0}}).params.do_sample


def test_tgi_nulls_mean_defaults():
    req = parse({"inputs": "x", "parameters": {"max_new_tokens": None, "stop": None, "seed": None}, "stream": None})
    assert req.params.max_new_tokens == 20 and req.params.stop == () and req.params.seed is None


@pytest.mark.parametrize(
    "body,needle",
    [
        ({"inputs": ""}, "inputs"),
        ({"inputs": []}, "inputs"),
        ({"inputs": ["ok", ""]}, "inputs[1]"),
        ({"inputs": ["ok", 3]}, "inputs[1]"),
        ({"inputs": 5}, "inputs"),
        ({"inputs": None}, "inputs"),
        ({"inputs": "x", "foo": 1}, "foo"),
        ({"inputs": "x", "parameters": {"max_new_token": 1}}, "max_new_token"),
        ({"inputs": "x", "parameters": {"max_new_tokens": "5"}}, "parameters.max_new_tokens"),
        ({"inputs": "x", "parameters": {"max_new_tokens": 5.0}}, "parameters.max_new_tokens"),
        ({"inputs": "x", "parameters": {"max_new_tokens": True}}, "parameters.max_new_tokens"),
        ({"inputs": "x", "parameters": {"max_new_tokens": 0}}, "parameters.max_new_tokens"),
        ({"inputs": "x", "parameters": {"max_new_tokens": 10**30}}, "parameters.max_new_tokens"),
        ({"inputs": "x", "parameters": {"temperature": -1}}, "parameters.temperature"),
        ({"inputs": "x", "parameters": {"temperature": 1e400}}, "parameters.temperature"),
        ({"inputs": "x", "parameters": {"top_p": 0}}, "parameters.top_p"),
        ({"inputs": "x", "parameters": {"top_p": 1.5}}, "parameters.top_p"),
        ({"inputs": "x", "parameters": {"repetition_penalty": 0}}, "parameters.repetition_penalty"),
        ({"inputs": "x", "parameters": {"stop": [""]}}, "parameters.stop"),
        ({"inputs": "x", "parameters": {"stop": [1]}}, "parameters.stop"),
        ({"inputs": "x", "parameters": {"stop": ["a"] * 17}}, "parameters.stop"),
        ({"inputs": "x", "parameters": {"seed": -(2**64)}}, "parameters.seed"),
        ({"inputs": "x", "parameters": {"details": "yes"}}, "parameters.details"),
        ({"inputs": "x", "parameters": {"best_of": 2}}, "best_of > 1 needs sampling"),
        ({"inputs": "x", "parameters": {"best_of": 2, "do_sample": True}, "stream": True}, "cannot be streamed"),
        ({"inputs": "x", "parameters": {"best_of": 9, "do_sample": True}}, "best_of must be between 1 and 8"),
        ({"inputs": "x", "parameters": {"watermark": True}}, "watermark"),
        ({"inputs": "x", "parameters": {"decoder_input_details": True}}, "decoder_input_details"),
        ({"inputs": "x", "parameters": {"grammar": {"type": "json"}}}, "grammar"),
        ({"inputs": "x", "parameters": {"top_n_tokens": 21}}, "parameters.top_n_tokens"),
        ({"inputs": "x", "parameters": []}, "parameters"),
        ({"inputs": ["a", "b"], "stream": True}, "stream"),
        ({"nothing": 1}, "inputs"),
        ([1, 2], "body"),
        (3, "body"),
    ],
)
def test_tgi_invalid_is_422_naming_the_field(body, needle):
    err = error_of(body)
    assert err.status == 422 and err.error_type == "validation"
    assert needle in err.message


def test_bare_string_is_an_input():
    assert parse("hello").inputs == ("hello",)


def test_batch_defaults_apply_under_request_values():
    values, _ = tgi_params({"max_new_tokens": 3, "temperature": 0.5}, LIMITS)
    limits = Limits(default_max_new_tokens=20, max_new_tokens=100, base=values)
    assert parse({"inputs": "x"}, limits=limits).params.max_new_tokens == 3
    assert parse({"inputs": "x", "parameters": {"max_new_tokens": 9}}, limits=limits).params.max_new_tokens == 9
    assert parse({"inputs": "x"}, limits=limits).params.temperature == 0.5


# ---- OpenAI chat ----

def test_chat_request_shape():
    req = parse({
        "model": "m", "messages": [
            {"role": "developer", "content": "sys"},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "auto",
        "documents": ["doc one", {"title": "t", "text": "two"}],
        "max_tokens": 9, "temperature": 0, "top_p": 0.9, "stop": "x", "seed": -1, "n": 1, "stream": True,
        "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2,
        "frequency_penalty": 0.1, "presence_penalty": 0.2, "response_format": {"type": "text"}})
    assert isinstance(req, ChatRequest)
    m = req.messages
    assert m[0] == {"role": "system", "content": "sys"} and m[1]["content"] == "hi there"
    assert m[2]["tool_calls"][0]["function"]["arguments"] == {"x": 1} and m[2]["content"] == ""
    assert m[3]["tool_call_id"] == "c1"
    assert req.tools[0]["function"]["name"] == "f"
    assert req.documents[0] == {"doc_id": 0, "text": "doc one"} and req.documents[1]["title"] == "t"
    p = req.params
    assert p.max_new_tokens == 9 and p.greedy and p.top_p == 0.9 and p.stop == ("x",) and p.seed == 2**64 - 1
    assert p.top_n_tokens == 2 and p.logprobs and p.presence_penalty == 0.2 and p.frequency_penalty == 0.1
    assert req.stream and req.include_usage and req.top_logprobs == 2


def test_chat_defaults_sample_like_openai():
    req = parse({"messages": [{"role": "user", "content": "hi"}]})
    assert req.params.do_sample and req.params.temperature == 1.0 and req.params.max_new_tokens == 20
    assert req.tools is None and not req.stream
    req = parse({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4, "max_tokens": 8})
    assert req.params.max_new_tokens == 4
    req = parse({"messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f"}}], "tool_choice": "none"})
    assert req.tools[0]["function"]["name"] == "f" and not req.calls and req.constraint is None  # listed, not called


@pytest.mark.parametrize(
    "body,needle",
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "content[0]"),
        ({"messages": [{"role": "user", "content": "x", "colour": 1}]}, "colour"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 9}, "n must be between 1 and 8"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n must be between 1 and 8"),
        ({"messages": [{"role": "user", "content": "x"}], "best_of": 2}, "best_of"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
         "response_format.type"),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools[0]"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": "f"}, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "documents": [3]}, "documents[0]"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "stream_options": {"foo": 1}}, "foo"),
        ({"messages": [{"role": "user", "content": "x"}], "stream_options": 0}, "stream_options"),
        ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 2}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": "x"}], "model": 5}, "model"),
        ({"messages": [{"role": "user", "content": "x"}], "functions": []}, "functions"),
    ],
)
def test_chat_invalid_is_422(body, needle):
    err = error_of(body)
    assert err.status == 422 and needle in err.message


# ---- OpenAI completions ----

def test_completion_shape_and_route():
    req = parse({"prompt": ["a", "b"], "max_tokens": 3, "echo": True, "logprobs": 2, "temperature": 0}, "completions")
    assert isinstance(req, CompletionRequest)
    assert req.prompts == ("a", "b") and req.echo and req.logprobs == 2 and req.params.top_n_tokens == 2
    assert req.params.max_new_tokens == 3 and req.params.greedy
    assert isinstance(parse({"prompt": "a"}), CompletionRequest)  # shape decides on /invocations


@pytest.mark.parametrize("body,needle", [
    ({"prompt": ""}, "prompt"), ({"prompt": [1, 2]}, "prompt"), ({"prompt": []}, "prompt"),
    ({"prompt": "a", "suffix": "z"}, "suffix"), ({"prompt": "a", "best_of": 1, "n": 2}, "best_of (1) must be >= n (2)"),
    ({"prompt": "a", "best_of": 2, "stream": True}, "cannot be streamed"), ({"prompt": "a", "best_of": 9}, "best_of"),
    ({"prompt": ["a", "b"], "stream": True}, "stream"), ({"prompt": "a", "logprobs": True}, "logprobs"),
])
def test_completion_invalid(body, needle):
    err = error_of(body, "completions")
    assert err.status == 422 and needle in err.message


def test_chat_route_requires_messages():
    assert "inputs" in error_of({"inputs": "x"}, "chat").message
    assert "messages" in error_of({"model": "x"}, "chat").message


def test_errors_serialise():
    err = error_of({"inputs": "x", "parameters": {"top_k": "many"}})
    json.dumps({"error": err.message, "error_type": err.error_type})


def test_error_messages_stay_short():
    err = error_of({"inputs": "x", "k" * 100_000: 1})
    assert err.status == 422 and len(err.message) <= 500


def test_limits_from_an_engine_config():
    from model.types import EngineConfig

    small = Limits.from_config(EngineConfig(max_input_tokens=50, max_total_tokens=100))
    assert (small.default_max_new_tokens, small.max_new_tokens, small.base) == (99, 99, {})  # the default yields
    lim = Limits.from_config(EngineConfig(), 300, base={"top_k": 5})
    assert (lim.default_max_new_tokens, lim.max_new_tokens, lim.base) == (300, 16383, {"top_k": 5})
    assert lim.with_base({"seed": 7}) == Limits(300, 16383, {"top_k": 5, "seed": 7}) and lim.base == {"top_k": 5}


def test_n_and_best_of_parse():
    chat = parse({"messages": [{"role": "user", "content": "x"}], "n": 3, "stream": True})
    assert (chat.n, chat.best_of, chat.stream) == (3, 3, True)
    cmpl = parse({"prompt": "a", "n": 2, "best_of": 5})
    assert (cmpl.n, cmpl.best_of) == (2, 5)
    tgi = parse({"inputs": "x", "parameters": {"best_of": 4, "temperature": 0.7, "seed": 3}})
    assert (tgi.n, tgi.best_of, tgi.params.seed) == (1, 4, 3)
    assert parse({"prompt": "a", "n": 8}, limits=Limits(max_n=8)).n == 8
    with pytest.raises(ProtocolError, match="n must be between 1 and 2"):
        parse({"prompt": "a", "n": 3}, limits=Limits(max_n=2))
    assert Limits.from_config(EngineConfig(max_concurrent_seqs=4), max_n=8).max_n == 4  # never more than the slots
