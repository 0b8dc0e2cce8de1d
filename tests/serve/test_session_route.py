"""SageMaker stateful sessions through the Flask app and the real engine on the tiny checkpoint."""

from __future__ import annotations

import json
import re

import pytest

from tests.fakes import wait_free
from tests.serve.test_app import sse_events
from tests.server_helpers import ready_app

ENV = {"MAX_CONCURRENT_SEQS": "4", "MAX_QUEUED_REQUESTS": "4", "MAX_INPUT_TOKENS": "1500", "MAX_TOTAL_TOKENS": "1600",
       "MAX_NEW_TOKENS": "6", "DEVICE": "cpu", "SESSION_MAX": "3"}
SID = "X-Amzn-SageMaker-Session-Id"
# botocore's shapes for the runtime's NewSessionId / ClosedSessionId response headers
NEW_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*;\sExpires=[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")


@pytest.fixture(scope="module")
def served(tiny_ckpt):
    app, client, engine = ready_app(tiny_ckpt, ENV)
    yield app, client, engine
    engine.shutdown(timeout=5)


def _open(client, body=None):
    r = client.post("/invocations", json=body or {"requestType": "NEW_SESSION"}, headers={SID: "NEW_SESSION"})
    assert r.status_code == 200, r.get_json()
    header = r.headers["X-Amzn-SageMaker-New-Session-Id"]
    assert NEW_PATTERN.match(header) and len(header) <= 256, header
    return header.split(";")[0], r


def _close(client, sid):
    r = client.post("/invocations", json={"requestType": "CLOSE"}, headers={SID: sid})
    assert r.status_code == 200 and r.headers["X-Amzn-SageMaker-Closed-Session-Id"] == sid
    return r


def _chat(client, messages, sid=None, **kw):
    headers = {SID: sid} if sid else {}
    body = {"messages": messages, "max_tokens": 5, "temperature": 0, **kw}  # greedy: comparable
    r = client.post("/invocations", json=body, headers=headers)
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def test_chat_turns_send_only_the_new_messages(served):
    app, client, engine = served
    sid, r = _open(client)
    assert r.get_json()["session_id"] == sid
    turns = [[{"role": "user", "content": f"question {i} about state space models"}] for i in range(4)]
    history, outs = [], []
    for new in turns:
        out = _chat(client, new, sid)
        outs.append(out)
        # the same conversation sent whole, outside the session: the same prompt and (greedy) the same answer
        history += new
        whole = _chat(client, history)
        assert out["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"]
        assert out["choices"][0]["message"]["content"] == whole["choices"][0]["message"]["content"]
        history.append({"role": "assistant", "content": out["choices"][0]["message"]["content"]})
    prompts = [o["usage"]["prompt_tokens"] for o in outs]
    assert prompts == sorted(prompts) and len(set(prompts)) == 4  # each turn carries the whole conversation
    cached = [o["usage"]["prompt_tokens_details"]["cached_tokens"] for o in outs]
    # at least the previous turn's prompt is resumed (its prompt-end snapshot); the end-of-answer snapshot too
    # when the answer's text re-tokenizes to the ids the model generated (random demo text often does not)
    assert cached[0] == 0 and all(c >= p for c, p in zip(cached[1:], prompts[:-1], strict=True)), cached
    _close(client, sid)
    r = client.post("/invocations", json={"messages": turns[0]}, headers={SID: sid})
    assert r.status_code == 410 and sid in r.get_json()["error"] and r.get_json()["error_type"] == "session_closed"
    s = wait_free(engine)
    assert s["prefix_cache"]["sessions"] == 0  # the closed session's pinned snapshot was released


def test_text_inputs_continue_the_session_ids_and_stream(served):
    _, client, engine = served
    sid, _ = _open(client, {"inputs": "once upon a time", "parameters": {"max_new_tokens": 4, "details": True}})
    n_prompt = len(engine.tokenizer.encode("once upon a time"))
    r = client.post("/invocations", headers={SID: sid}, json={"inputs": " and then", "stream": True,
                                                              "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200
    last = json.loads(sse_events(r.data)[-1])
    expect = n_prompt + 4 + len(engine.tokenizer.encode(" and then"))
    assert last["details"]["prompt_tokens"] == expect and last["details"]["cached_tokens"] > 0
    r = client.post("/invocations", headers={SID: sid}, json={"inputs": "!", "parameters": {"details": True}})
    assert r.get_json()[0]["details"]["prompt_tokens"] == expect + 3 + len(engine.tokenizer.encode("!"))
    _close(client, sid)
    wait_free(engine)


def test_errors_name_the_session(served):
    _, client, engine = served
    unknown = "w0-" + "0" * 32
    r = client.post("/invocations", json={"inputs": "x"}, headers={SID: unknown})
    assert r.status_code == 404 and unknown in r.get_json()["error"]
    r = client.post("/invocations", json={"inputs": "x"}, headers={SID: "not a valid id"})
    assert r.status_code == 400 and r.get_json()["error_type"] == "invalid_session"
    r = client.post("/invocations", json={"requestType": "CLOSE"}, headers={SID: "NEW_SESSION"})
    assert r.status_code == 400
    sid, _ = _open(client)
    r = client.post("/invocations", data=b'{"inputs": "a"}\n{"inputs": "b"}\n', headers={SID: sid},
                    content_type="application/jsonlines")
    assert r.status_code == 400 and "JSON Lines" in r.get_json()["error"]
    r = client.post("/invocations", json={"inputs": ["a", "b"]}, headers={SID: sid})
    assert r.status_code == 400 and "one prompt" in r.get_json()["error"]
    r = client.post("/invocations", json={"requestType": "NEW_SESSION"}, headers={SID: sid})
    assert r.status_code == 400
    assert _chat(client, [{"role": "user", "content": "still usable"}], sid)["choices"]  # after the errors
    _close(client, sid)
    wait_free(engine)


def test_number_of_sessions_is_bounded_and_metrics_count_them(served):
    _, client, engine = served
    ids = [_open(client)[0] for _ in range(3)]
    r = client.post("/invocations", json={"requestType": "NEW_SESSION"}, headers={SID: "NEW_SESSION"})
    assert r.status_code == 429 and "SESSION_MAX" in r.get_json()["error"]
    assert "granite_sessions_open 3.0" in client.get("/metrics").data.decode().splitlines()
    for sid in ids:
        _close(client, sid)
    assert "granite_sessions_open 0.0" in client.get("/metrics").data.decode().splitlines()


def test_a_session_of_a_restarting_worker_is_503_when_kept_on_disk(served, tmp_path):
    from serve.affinity import WorkerId, WorkerLink

    app, client, engine = served
    state = app.extensions["granite"]
    assert state.sessions.durable  # the disk tier is on (the server's default)
    state.link = WorkerLink(WorkerId(0, 2, str(tmp_path)), app, timeout_s=5)  # worker 1 is not listening
    sid = "w1-" + "0" * 32
    store = state.sessions._store
    try:
        r = client.post("/invocations", json={"inputs": "hi"}, headers={SID: sid})
        assert r.status_code == 503 and r.get_json()["error_type"] == "session_worker_restarting"
        state.sessions._store = None  # without the disk tier the session died with its worker
        r = client.post("/invocations", json={"inputs": "hi"}, headers={SID: sid})
        assert r.status_code == 404 and sid in r.get_json()["error"]
    finally:
        state.link = None
        state.sessions._store = store
