"""Abandoned non-streaming requests (serve/watch.py): a client that hangs up, or a request past its
deadline, has its sequences cancelled and its slots freed; the deadline answers a JSON 504."""

import socket
import threading
import time

import pytest

from serve.app import create_app
from serve.config import load_config
from serve.watch import DEADLINE, DISCONNECTED, Watch, watching
from tests.fakes import fake_engine, req, wait_free


class Recorder:
    def __init__(self):
        self.cancelled = threading.Event()

    def cancel(self):
        self.cancelled.set()


def test_a_closed_peer_cancels_the_watched_handles():
    ours, theirs = socket.socketpair()
    with watching(ours, None) as w:
        h = Recorder()
        w.add(h)
        time.sleep(0.3)
        assert not h.cancelled.is_set() and w.reason is None  # open and quiet: left alone
        theirs.close()
        assert h.cancelled.wait(2) and w.reason == DISCONNECTED
        late = Recorder()
        w.add(late)  # submitted after the client left: cancelled at once
        assert late.cancelled.is_set()
    ours.close()


def test_pipelined_bytes_do_not_count_as_a_hang_up():
    ours, theirs = socket.socketpair()
    theirs.sendall(b"GET /ping HTTP/1.1\r\n\r\n")
    w = Watch(ours, None)
    w.check(time.monotonic())
    assert w.reason is None
    ours.close()
    theirs.close()


def test_the_deadline_cancels():
    with watching(None, 0.2) as w:
        h = Recorder()
        w.add(h)
        assert h.cancelled.wait(2) and w.reason == DEADLINE


@pytest.fixture()
def slow_app():
    # 0.05 s per engine step: 150 tokens would take 7.5 s, far past the 0.5 s deadline.
    engine = fake_engine(slots=2, delay_s=0.05, max_input_tokens=100, max_total_tokens=400, name="slow")
    cfg = load_config({"REQUEST_TIMEOUT": "0.5", "DEVICE": "cpu", "MAX_TOTAL_TOKENS": "400",
                       "MAX_INPUT_TOKENS": "100", "MAX_CONCURRENT_SEQS": "2"})
    app = create_app(cfg, engine)
    client = app.test_client()
    deadline = time.monotonic() + 30
    while client.get("/ping").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    engine.submit(req("a", max_new_tokens=1)).result()  # the first submit imports torch (seconds under load)
    yield client, engine
    engine.shutdown(timeout=2)




@pytest.mark.parametrize("kwargs", [
    {"json": {"inputs": "abc", "parameters": {"max_new_tokens": 150}}},
    {"json": {"inputs": ["abc", "def", "ghi"], "parameters": {"max_new_tokens": 150}}},  # 3 on 2 slots
    {"data": b'{"inputs": "abc", "parameters": {"max_new_tokens": 150}}\n"def"\n"ghi"\n',
     "content_type": "application/jsonlines"},
])
def test_a_request_past_its_deadline_answers_504_and_frees_its_slots(slow_app, kwargs):
    client, engine = slow_app
    ran_out = engine.stats()["finished_total"]["length"]
    t0 = time.monotonic()
    r = client.post("/invocations", **kwargs)
    took = time.monotonic() - t0
    assert r.status_code == 504, r.data
    body = r.get_json()
    assert body["error_type"] == "timeout" and "REQUEST_TIMEOUT" in body["error"]
    assert took < 4.0, took
    wait_free(engine, timeout=5.0)
    assert engine.stats()["finished_total"]["length"] == ran_out  # nothing ran to the end for nobody


def test_streams_have_no_deadline(slow_app):
    client, engine = slow_app
    r = client.post("/invocations", json={"inputs": "abc", "stream": True, "parameters": {"max_new_tokens": 15}})
    assert r.status_code == 200 and r.data.count(b"data:") == 15  # 0.75 s > the 0.5 s deadline
    wait_free(engine, timeout=5.0)


def test_batch_transform_has_no_deadline_by_default():
    assert load_config({"SAGEMAKER_BATCH": "true"}).server.request_timeout_s is None
    assert load_config({}).server.request_timeout_s == 60
    assert load_config({"SAGEMAKER_BATCH": "true", "REQUEST_TIMEOUT": "30"}).server.request_timeout_s == 30
    assert load_config({"REQUEST_TIMEOUT": "0"}).server.request_timeout_s is None
