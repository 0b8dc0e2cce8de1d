"""code/inference.py (the example override hooks), loaded the way the server loads it from a model dir."""

import json
import shutil

import pytest

from serve.handler import HOOKS, JsonLines, Stream, load_user_module
from tests.sdk_helpers import CODE


@pytest.fixture(scope="module")
def hooks(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("model")
    (model_dir / "code").mkdir()
    shutil.copy(CODE / "inference.py", model_dir / "code" / "inference.py")
    return load_user_module(model_dir)


def test_only_input_and_output_are_overridden(hooks):
    assert [h for h in HOOKS if hasattr(hooks, h)] == ["input_fn", "output_fn"]


def test_system_prompt_added_once(hooks):
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    data = hooks.input_fn(body, "application/json")
    assert data["messages"][0] == {"role": "system", "content": hooks.SYSTEM_PROMPT}
    assert data["messages"][1:] == [{"role": "user", "content": "hi"}] and data["max_tokens"] == 4
    own = {"messages": [{"role": "system", "content": "mine"}, {"role": "user", "content": "hi"}]}
    assert hooks.input_fn(json.dumps(own), "application/json") == own
    tgi = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
    assert hooks.input_fn(json.dumps(tgi).encode(), "application/json; charset=utf-8") == tgi


def test_jsonlines_lines_keep_count_and_order(hooks):
    lines = [json.dumps({"messages": [{"role": "user", "content": "a"}]}), "not json", "",
             json.dumps({"inputs": "b"})]
    data = hooks.input_fn("\n".join(lines).encode() + b"\n", "application/jsonlines")
    assert isinstance(data, JsonLines) and len(data) == 4
    assert json.loads(data[0])["messages"][0]["role"] == "system"
    assert data[1:] == [b"not json", b"", json.dumps({"inputs": "b"}).encode()]


def test_unsupported_content_type_still_refused(hooks):
    with pytest.raises(Exception, match="unsupported content type"):
        hooks.input_fn(b"x", "text/csv")


def test_output_postprocessing(hooks):
    body, ctype = hooks.output_fn([{"generated_text": "  hi there \n", "details": {"generated_tokens": 3}}],
                                  "application/json")
    assert ctype == "application/json"
    assert json.loads(body) == [{"generated_text": "hi there", "details": {"generated_tokens": 3},
                                 "postprocessed": True}]
    chat = {"choices": [{"message": {"role": "assistant", "content": "\n yo "}, "finish_reason": "stop"}],
            "usage": {"total_tokens": 5}}
    out = json.loads(hooks.output_fn(chat, "application/json")[0])
    assert out["choices"][0]["message"]["content"] == "yo" and out["postprocessed"] is True
    assert chat["choices"][0]["message"]["content"] == "\n yo "  # the prediction itself is not mutated


def test_jsonlines_and_errors_and_streams(hooks):
    pred = JsonLines([{"generated_text": " a "}, {"error": "bad", "error_type": "validation", "status": 422}])
    body, ctype = hooks.output_fn(pred, "application/jsonlines")
    assert ctype == "application/jsonlines"
    assert [json.loads(x) for x in body.decode().splitlines()] == [
        {"generated_text": "a", "postprocessed": True}, {"error": "bad", "error_type": "validation", "status": 422}]
    events = iter([b"data: {}\n\n"])
    body, ctype = hooks.output_fn(Stream(events), "text/event-stream")
    assert body is events and ctype == "text/event-stream"
