"""serve/handler.py on the real engine (tiny checkpoint): records for batch / JSON Lines, and the
code/inference.py override hooks."""

import json
import types

import pytest

from model.engine.engine import Engine
from serve.handler import (
    JsonLines,
    Service,
    Stream,
    default_input_fn,
    default_output_fn,
    handle_record,
    handle_records,
    load_user_module,
)
from serve.protocol import Limits, ProtocolError


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    from serve.config import load_config

    cfg = load_config({"MAX_CONCURRENT_SEQS": "4", "MAX_QUEUED_REQUESTS": "2", "MAX_INPUT_TOKENS": "100",
                       "MAX_TOTAL_TOKENS": "128", "DEVICE": "cpu"})
    eng = Engine(tiny_ckpt, cfg.engine, "tiny-handler")
    eng.start()
    assert eng.wait_ready(120), eng.error
    yield eng
    eng.shutdown(timeout=5)


LIMITS = Limits(default_max_new_tokens=2, max_new_tokens=100)


def test_record_shapes(engine):
    one = handle_record(engine, '{"inputs": "abc", "parameters": {"max_new_tokens": 3}}')
    assert one["details"]["generated_tokens"] == 3 and isinstance(one["generated_text"], str)
    many = handle_record(engine, '{"inputs": ["a", "b"], "parameters": {"max_new_tokens": 1}}')
    assert isinstance(many, list) and len(many) == 2
    bare = handle_record(engine, '"just text"', {"max_new_tokens": 2})
    assert bare["details"]["generated_tokens"] == 2
    chat = handle_record(engine, json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}))
    assert chat["object"] == "chat.completion" and chat["usage"]["completion_tokens"] == 1


def test_record_defaults_sit_under_the_record(engine):
    assert handle_record(engine, '"x"', {"max_new_tokens": 1})["details"]["generated_tokens"] == 1
    out = handle_record(engine, '{"inputs": "x", "parameters": {"max_new_tokens": 4}}', {"max_new_tokens": 1})
    assert out["details"]["generated_tokens"] == 4


@pytest.mark.parametrize("record,defaults,status", [
    ("{nope", None, 400),
    ("", None, 400),
    ("\udcff", None, 400),
    ('{"inputs": "x", "parameters": {"temperature": "hot"}}', None, 422),
    ('{"inputs": "' + "word " * 300 + '"}', None, 422),
    ('"x"', {"max_new_tokens": "many"}, 422),
    ('"x"', {"unknown_knob": 1}, 422),
    ("[1, 2]", None, 422),
])
def test_bad_records_become_error_objects(engine, record, defaults, status):
    out = handle_record(engine, record, defaults)
    assert out["status"] == status and out["error"] and out["error_type"], out


def test_records_in_order_beyond_the_queue(engine):
    lines = [json.dumps({"inputs": f"n{i}", "parameters": {"max_new_tokens": 1 + i % 3}}) for i in range(12)]
    lines.insert(5, "{broken")
    out = handle_records(engine, lines)
    assert len(out) == 13 and out[5]["status"] == 400
    gen = [o["details"]["generated_tokens"] for i, o in enumerate(out) if i != 5]
    assert gen == [1 + i % 3 for i in range(12)]
    s = engine.stats()
    assert s["free_slots"] == s["total_slots"] and s["waiting"] == 0


def test_not_ready_engine_gives_503_records(tiny_ckpt):
    from model.types import EngineConfig

    cold = Engine(tiny_ckpt, EngineConfig(), "cold")  # never started
    out = handle_record(cold, '{"inputs": "x"}')
    assert out["status"] == 503 and out["error_type"] == "not_ready"


def test_default_input_and_output_fns():
    assert default_input_fn(b'{"a": 1}', "application/json; charset=utf-8") == {"a": 1}
    assert default_input_fn(b'1\n2\n', "application/jsonlines") == JsonLines([b"1", b"2"])
    with pytest.raises(ProtocolError) as err:
        default_input_fn(b"x", "text/csv")
    assert err.value.status == 415
    assert default_output_fn({"a": "é"}, "*/*") == ('{"a":"é"}\n'.encode(), "application/json")
    assert default_output_fn(JsonLines([{"a": 1}, {"b": 2}]), None) == (b'{"a":1}\n{"b":2}\n', "application/jsonlines")
    assert default_output_fn("raw", "text/plain") == ("raw", "text/plain")
    body = iter([b"data:x\n\n"])
    assert default_output_fn(Stream(body), None) == (body, "text/event-stream")


def test_default_service_pipeline(engine, tmp_path):
    svc = Service(engine, tmp_path, LIMITS)
    svc.load_model()
    assert svc.model is engine
    body, ctype = svc.invoke(b'{"inputs": "hi"}', "application/json", None)
    assert ctype == "application/json" and json.loads(body)[0]["details"]["generated_tokens"] == 2
    body, ctype = svc.invoke(b'{"inputs": "hi", "stream": true}', "application/json", None)
    assert ctype == "text/event-stream" and b"".join(body).count(b"\n\n") == 2


def test_user_hooks_override_defaults(engine, tmp_path):
    calls = []

    def model_fn(model_dir):
        calls.append(("model_fn", model_dir))
        return {"engine": engine, "tag": "mine"}

    def input_fn(body, content_type):
        assert content_type == "text/plain"
        return {"inputs": body.decode(), "parameters": {"max_new_tokens": 1}}

    def predict_fn(data, model):
        assert model["tag"] == "mine"
        out = handle_record(model["engine"], json.dumps(data))
        return {"text": out["generated_text"], "n": out["details"]["generated_tokens"]}

    def output_fn(prediction, accept):
        return f"n={prediction['n']}"  # a bare body: the response type comes from Accept

    user = types.SimpleNamespace(model_fn=model_fn, input_fn=input_fn, predict_fn=predict_fn, output_fn=output_fn)
    svc = Service(engine, tmp_path, LIMITS, user=user)
    svc.load_model()
    assert calls == [("model_fn", str(tmp_path))]
    assert svc.invoke(b"hello", "text/plain", "text/csv") == ("n=1", "text/csv")


def test_transform_fn_wins(engine, tmp_path):
    def transform_fn(model, body, content_type, accept):
        return {"echo": body.decode(), "engine": model is engine}, "application/x-echo"

    svc = Service(engine, tmp_path, LIMITS, user=types.SimpleNamespace(transform_fn=transform_fn))
    svc.load_model()
    body, ctype = svc.invoke(b"ping", "anything/at-all", None)
    assert ctype == "application/x-echo" and json.loads(body) == {"echo": "ping", "engine": True}


def test_only_predict_fn_keeps_default_model(engine, tmp_path):
    # default model_fn returns the engine; a user predict_fn receives it
    svc = Service(engine, tmp_path, LIMITS, user=types.SimpleNamespace(predict_fn=lambda d, m: {"ready": m.ready}))
    svc.load_model()
    assert json.loads(svc.invoke(b"{}", "application/json", None)[0]) == {"ready": True}


def test_load_user_module_from_model_dir(tmp_path):
    assert load_user_module(tmp_path) is None
    code = tmp_path / "code"
    code.mkdir()
    (code / "helper_for_test_handler.py").write_text("VALUE = 41\n")
    (code / "inference.py").write_text("import helper_for_test_handler\n"
                                       "def output_fn(p, a):\n    return str(helper_for_test_handler.VALUE + 1)\n")
    module = load_user_module(tmp_path)
    assert module.output_fn(None, None) == "42"
