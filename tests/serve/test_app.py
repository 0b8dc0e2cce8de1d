"""The Flask app with the real engine on the tiny checkpoint (Flask test client; no gunicorn here)."""

import json
import time

import pytest

from model.engine.engine import Engine
from model.types import GenerationRequest, SamplingParams
from serve.app import create_app
from serve.config import load_config
from tests.fakes import wait_free

ENV = {"MAX_CONCURRENT_SEQS": "4", "MAX_QUEUED_REQUESTS": "4", "MAX_INPUT_TOKENS": "1000", "MAX_TOTAL_TOKENS": "1100",
       "MAX_NEW_TOKENS": "6", "DEVICE": "cpu", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "1"}
ATTR = "X-Amzn-SageMaker-Custom-Attributes"




def sse_events(data: bytes) -> list[str]:
    text = data.decode()
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data:") for e in events), events
    return [e[5:].strip() for e in events]


@pytest.fixture(scope="module")
def served(tiny_ckpt):
    cfg = load_config(ENV)
    engine = Engine(tiny_ckpt, cfg.engine, "tiny-test")
    app = create_app(cfg, engine)
    client = app.test_client()
    first = client.get("/ping")
    assert first.status_code == 503 and first.get_json()["error_type"] == "not_ready"  # loading in background
    deadline = time.monotonic() + 120
    while client.get("/ping").status_code != 200:
        assert time.monotonic() < deadline, engine.error
        time.sleep(0.05)
    yield app, client, engine
    engine.shutdown(timeout=5)


def test_ping_ready_empty_body(served):
    _, client, _ = served
    r = client.get("/ping")
    assert r.status_code == 200 and r.data == b""


def test_tgi_single_and_details(served):
    _, client, engine = served
    r = client.post("/invocations", json={"inputs": "hello world", "parameters": {"max_new_tokens": 5, "details": True}})
    assert r.status_code == 200, r.data
    (item,) = r.get_json()
    d = item["details"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 5
    assert d["prompt_tokens"] == len(engine.tokenizer.encode("hello world"))
    assert len(d["tokens"]) == 5 and "".join(t["text"] for t in d["tokens"]) == item["generated_text"]
    again = client.post("/invocations", json={"inputs": "hello world", "parameters": {"max_new_tokens": 5}})
    item2 = again.get_json()[0]
    assert item2["generated_text"] == item["generated_text"]  # greedy is deterministic
    assert set(item2["details"]) >= {"finish_reason", "generated_tokens", "prompt_tokens"}  # even without details
    assert "tokens" not in item2["details"]


def test_tgi_list_full_text_truncate_and_top_tokens(served):
    _, client, engine = served
    r = client.post("/invocations", json={"inputs": ["one two three four", "five"], "parameters": {
        "max_new_tokens": 3, "return_full_text": True, "truncate": 2, "details": True, "top_n_tokens": 2}})
    assert r.status_code == 200, r.data
    a, b = r.get_json()
    assert a["generated_text"].startswith("one two three four") and b["generated_text"].startswith("five")
    assert a["details"]["prompt_tokens"] == 2
    assert all(len(tops) == 2 for tops in a["details"]["top_tokens"])


def test_sampling_with_seed_is_reproducible(served):
    _, client, _ = served
    body = {"inputs": "abc", "parameters": {"max_new_tokens": 6, "do_sample": True, "temperature": 1.5, "seed": 7}}
    texts = {client.post("/invocations", json=body).get_json()[0]["generated_text"] for _ in range(2)}
    assert len(texts) == 1
    assert client.post("/invocations", json=body).get_json()[0]["details"]["seed"] == 7


def test_tgi_stream_events(served):
    _, client, engine = served
    r = client.post("/invocations", json={"inputs": "stream me", "stream": True, "parameters": {"max_new_tokens": 4}})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    assert r.headers["X-Accel-Buffering"] == "no"
    events = [json.loads(e) for e in sse_events(r.data)]
    assert [e["index"] for e in events] == [0, 1, 2, 3]
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert last["details"]["finish_reason"] == "length" and last["details"]["generated_tokens"] == 4
    assert {"id", "text", "logprob", "special"} <= set(last["token"])
    plain = client.post("/invocations", json={"inputs": "stream me", "parameters": {"max_new_tokens": 4}})
    assert plain.get_json()[0]["generated_text"] == last["generated_text"]


def test_chat_on_invocations_and_v1(served):
    _, client, _ = served
    body = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    for route in ("/invocations", "/v1/chat/completions"):
        r = client.post(route, json=body)
        assert r.status_code == 200, r.data
        out = r.get_json()
        assert out["object"] == "chat.completion" and out["model"] == "tiny-test"
        choice = out["choices"][0]
        assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
        assert out["usage"]["completion_tokens"] == 4
        assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + 4
        assert len(choice["logprobs"]["content"]) == 4
        assert all(len(x["top_logprobs"]) == 2 for x in choice["logprobs"]["content"])


def test_chat_stream_chunks_end_with_done(served):
    _, client, _ = served
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                                  "temperature": 0, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    events = sse_events(r.data)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 3 and chunks[-1]["choices"] == []
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    full = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 3, "temperature": 0}).get_json()
    assert streamed == full["choices"][0]["message"]["content"]


def test_completions(served):
    _, client, _ = served
    r = client.post("/v1/completions", json={"prompt": ["ab", "cd"], "max_tokens": 3, "temperature": 0, "echo": True,
                                             "logprobs": 1})
    assert r.status_code == 200, r.data
    out = r.get_json()
    assert out["object"] == "text_completion" and [c["index"] for c in out["choices"]] == [0, 1]
    assert out["choices"][0]["text"].startswith("ab") and out["usage"]["completion_tokens"] == 6
    assert len(out["choices"][0]["logprobs"]["tokens"]) == 3
    r = client.post("/invocations", json={"prompt": "ab", "max_tokens": 2, "temperature": 0, "stream": True})
    events = sse_events(r.data)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


def test_jsonlines_bad_line_in_the_middle(served):
    _, client, engine = served
    lines = [b'{"inputs": "a", "parameters": {"max_new_tokens": 2}}', b"{not json", b'"bare string"',
             b'{"inputs": "x", "parameters": {"colour": 1}}', b"",
             b'{"messages": [{"role": "user", "content": "q"}], "max_tokens": 2}', b'{"prompt": "p", "max_tokens": 2}']
    r = client.post("/invocations", data=b"\n".join(lines) + b"\n", content_type="application/jsonlines")
    assert r.status_code == 200 and r.mimetype == "application/jsonlines"
    out = [json.loads(x) for x in r.data.decode().splitlines()]
    assert len(out) == len(lines)
    assert out[0]["details"]["generated_tokens"] == 2
    assert out[1]["status"] == 400 and out[1]["error_type"] == "bad_request"
    assert "generated_text" in out[2]
    assert out[3]["status"] == 422 and "colour" in out[3]["error"]
    assert out[4]["status"] == 400
    assert out[5]["object"] == "chat.completion" and out[6]["object"] == "text_completion"


def test_jsonlines_more_records_than_the_queue_holds(served):
    _, client, engine = served
    body = "".join(json.dumps({"inputs": f"r{i}", "parameters": {"max_new_tokens": 2}}) + "\n" for i in range(20))
    r = client.post("/invocations", data=body, content_type="application/jsonlines")
    out = [json.loads(x) for x in r.data.decode().splitlines()]
    assert len(out) == 20 and all("generated_text" in o for o in out), out
    wait_free(engine)


def test_long_input_list_waits_for_its_own_work(served):
    _, client, engine = served
    # 12 inputs > 4 slots + 4 queued: the request makes room by finishing its own oldest inputs
    r = client.post("/invocations", json={"inputs": [f"x{i}" for i in range(12)], "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200, r.data
    assert [i["details"]["prompt_tokens"] > 0 for i in r.get_json()] == [True] * 12
    wait_free(engine)


def test_queue_full_of_other_work_is_429_and_frees_everything(served):
    _, client, engine = served
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)  # busy until cancelled
    hogs = [engine.submit(GenerationRequest((5, 6, 7), params)) for _ in range(4)]
    try:
        deadline = time.monotonic() + 20
        while engine.stats()["running"] < 4:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        hogs += [engine.submit(GenerationRequest((5, 6, 7), params)) for _ in range(4)]  # the queue is full now
        r = client.post("/invocations", json={"inputs": "one more", "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 429 and r.get_json()["error_type"] == "queue_full"
    finally:
        for h in hogs:
            h.cancel()
    wait_free(engine)


def test_input_too_long_is_422(served):
    _, client, _ = served
    r = client.post("/invocations", json={"inputs": "word " * 2000})
    assert r.status_code == 422 and r.get_json()["error_type"] == "input_too_long"


@pytest.mark.parametrize("kwargs,status,kind", [
    ({"data": b"{oops", "content_type": "application/json"}, 400, "bad_request"),
    ({"data": b"\xff\xfe", "content_type": "application/json"}, 400, "bad_request"),
    ({"data": b"a,b", "content_type": "text/csv"}, 415, "unsupported_media_type"),
    ({"json": {"inputs": ""}}, 422, "validation"),
    ({"json": {"inputs": "x", "parameters": {"max_new_tokens": "3"}}}, 422, "validation"),
    ({"data": b"x" * (1024 * 1024 + 1), "content_type": "application/json"}, 413, "payload_too_large"),
])
def test_errors_are_json(served, kwargs, status, kind):
    _, client, _ = served
    r = client.post("/invocations", headers={ATTR: "trace=1"}, **kwargs)
    assert r.status_code == status and r.mimetype == "application/json"
    assert r.get_json()["error_type"] == kind and r.get_json()["error"]
    assert r.headers[ATTR] == "trace=1"


def test_unknown_routes_are_json(served):
    _, client, _ = served
    assert client.get("/nope").get_json()["error_type"] == "not_found"
    assert client.get("/invocations").status_code == 405
    assert client.get("/invocations").get_json()["error_type"] == "method_not_allowed"


def test_custom_attributes_echoed(served):
    _, client, _ = served
    r = client.post("/invocations", json={"inputs": "x", "parameters": {"max_new_tokens": 1}}, headers={ATTR: "a=b"})
    assert r.headers[ATTR] == "a=b"
    assert ATTR not in client.post("/invocations", json={"inputs": "x", "parameters": {"max_new_tokens": 1}}).headers


def test_stream_disconnect_cancels(served):
    _, client, engine = served
    r = client.post("/invocations", json={"inputs": "long", "stream": True, "parameters": {"max_new_tokens": 200}},
                    buffered=False)
    first = next(iter(r.response))
    assert first.startswith(b"data:")
    r.close()  # the client goes away: GeneratorExit -> handle.cancel()
    s = wait_free(engine)
    assert s["finished_total"]["cancelled"] >= 1


def test_models_execution_parameters_metrics(served):
    _, client, _ = served
    assert client.get("/v1/models").get_json()["data"][0]["id"] == "tiny-test"
    assert client.get("/execution-parameters").get_json() == {
        "MaxConcurrentTransforms": 4, "BatchStrategy": "MULTI_RECORD", "MaxPayloadInMB": 1}
    text = client.get("/metrics").data.decode()
    assert 'granite_requests_total{route="/invocations",status="200"}' in text
    for name in ("granite_queue_depth", "granite_running_sequences", "granite_free_slots 4.0",
                 "granite_time_to_first_token_seconds_bucket", "granite_time_per_output_token_seconds_count",
                 "granite_engine_generated_tokens_total"):
        assert name in text


def test_failed_model_load_pings_503(tmp_path):
    cfg = load_config({**ENV, "MODEL_DIR": str(tmp_path / "missing")})
    app = create_app(cfg)  # resolves MODEL_DIR in the background: no model there
    client = app.test_client()
    state = app.extensions["granite"]
    deadline = time.monotonic() + 30
    while state.error is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = client.get("/ping")
    assert r.status_code == 503 and "no model" in r.get_json()["error"]
    r = client.post("/invocations", json={"inputs": "x"})
    assert r.status_code == 503 and r.get_json()["error_type"] == "not_ready"


def test_chat_with_tools_documents_and_tool_history(served):
    _, client, _ = served
    body = {"messages": [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": '{"temp": 20}', "tool_call_id": "c1"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        "documents": ["Paris is in France."], "max_tokens": 2, "temperature": 0}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.data
    with_tools = r.get_json()["usage"]["prompt_tokens"]
    body.pop("tools")
    assert client.post("/v1/chat/completions", json=body).get_json()["usage"]["prompt_tokens"] < with_tools


def test_importing_the_app_does_not_import_torch():
    # the worker binds and answers /ping before torch (imported by the engine loader thread) is loaded
    import subprocess
    import sys

    code = "import sys, serve.app, serve.gunicorn_conf; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_json_bodies_end_with_a_newline(served):
    # langchain-aws's LineIterator (and other line-based readers) wait for the newline that ends a body.
    _, client, _ = served
    bodies = [
        client.post("/invocations", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}),
        client.post("/invocations", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}),
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        client.post("/invocations", data=b"{oops", content_type="application/json"),
        client.get("/nowhere"),
        client.get("/v1/models"),
    ]
    for r in bodies:
        assert r.mimetype == "application/json" and r.data.endswith(b"\n"), (r.status_code, r.data[-40:])
        assert r.data.count(b"\n") == 1
