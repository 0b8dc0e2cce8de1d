"""The whole server as SageMaker runs it: `python -m serve serve` (gunicorn gthread) on a free port,
with the tiny checkpoint in MODEL_DIR plus a code/inference.py that overrides output_fn.
The SIGTERM test stops the shared server, so it is the last test in this file."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from tests.server_helpers import ROOT, ServerProcess, iter_sse

pytestmark = pytest.mark.slow  # a real gunicorn process + model load: ~30-60 s on 2 cores
ATTR = "X-Amzn-SageMaker-Custom-Attributes"
INFERENCE_PY = '''
import json
from serve.handler import default_output_fn

def output_fn(prediction, accept):
    # Wrap plain JSON predictions for clients that ask for it; everything else as the server would.
    if accept == "application/x-wrapped":
        return json.dumps({"wrapped": prediction}), "application/x-wrapped"
    return default_output_fn(prediction, accept)
'''


def run_main(*args, **env):
    return subprocess.run([sys.executable, "-m", "serve", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **env})


def test_main_rejects_bad_config_naming_the_variable():
    r = run_main("serve", SAGEMAKER_MAX_PAYLOAD_IN_MB="lots")
    assert r.returncode == 2 and "SAGEMAKER_MAX_PAYLOAD_IN_MB" in r.stderr


def test_main_usage_and_batch_delegation():
    assert run_main("frobnicate").returncode == 2
    r = run_main("batch", "--help")
    assert r.returncode == 0 and "--input" in r.stdout


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("model") / "model"
    shutil.copytree(tiny_ckpt, model_dir)
    (model_dir / "code").mkdir()
    (model_dir / "code" / "inference.py").write_text(INFERENCE_PY)
    srv = ServerProcess({"MODEL_DIR": str(model_dir), "MAX_CONCURRENT_SEQS": "16", "MAX_QUEUED_REQUESTS": "32",
                         "MAX_INPUT_TOKENS": "256", "MAX_TOTAL_TOKENS": "512", "MAX_NEW_TOKENS": "8",
                         "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS": "3"},
                        tmp_path_factory.mktemp("log") / "server.log")
    srv.wait_ready()
    yield srv
    srv.stop()


def test_ping_and_info_routes(server):
    r = requests.get(server.url + "/ping", timeout=2)
    assert r.status_code == 200 and r.content == b""
    assert requests.get(server.url + "/v1/models", timeout=5).json()["data"][0]["id"] == "model"
    assert requests.get(server.url + "/execution-parameters", timeout=5).json() == {
        "MaxConcurrentTransforms": 3, "BatchStrategy": "MULTI_RECORD", "MaxPayloadInMB": 6}


def test_tgi_chat_completions_json(server):
    r = server.post("/invocations", {"inputs": "hello", "parameters": {"max_new_tokens": 4, "details": True}},
                    headers={ATTR: "trace_id=42"})
    assert r.status_code == 200, r.text
    assert r.headers[ATTR] == "trace_id=42"
    (item,) = r.json()
    assert item["details"]["generated_tokens"] == 4 and len(item["details"]["tokens"]) == 4
    # random weights: sampling may end early on EOS, so counts are bounded rather than exact
    r = server.post("/invocations", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.json()["object"] == "chat.completion" and 1 <= r.json()["usage"]["completion_tokens"] <= 3
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    r = server.post("/v1/completions", {"prompt": "abc", "max_tokens": 2, "temperature": 0})
    assert r.json()["object"] == "text_completion" and 1 <= r.json()["usage"]["completion_tokens"] <= 2
    r = server.post("/invocations", {"prompt": ["abc", "de"], "max_tokens": 2, "temperature": 0})
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    r = server.post("/invocations", {"inputs": ["a", "b", "c"], "parameters": {"max_new_tokens": 2}})
    assert len(r.json()) == 3 and all(x["details"]["generated_tokens"] >= 1 for x in r.json())
    r = requests.get(server.url + "/metrics", timeout=5)
    assert r.headers["Content-Type"].startswith("text/plain") and "granite_requests_total" in r.text


def test_tgi_stream_event_by_event(server):
    r = server.post("/invocations", {"inputs": "tell me", "stream": True, "parameters": {"max_new_tokens": 6}},
                    stream=True)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    assert r.headers.get("Transfer-Encoding") == "chunked"
    events = [json.loads(e) for e in iter_sse(r)]
    assert [e["index"] for e in events] == list(range(6))
    assert events[-1]["details"]["finish_reason"] == "length"
    assert events[-1]["generated_text"] == "".join(e["token"]["text"] for e in events)


def test_openai_stream_event_by_event(server):
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                             "stream": True, "stream_options": {"include_usage": True}}, stream=True)
    events = list(iter_sse(r))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-2]["choices"][0]["finish_reason"] in ("length", "stop")
    assert 1 <= chunks[-1]["usage"]["completion_tokens"] <= 4
    r = server.post("/invocations", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                     "stream": True}, stream=True)
    assert list(iter_sse(r))[-1] == "[DONE]"


def test_jsonlines_bad_line_in_the_middle(server):
    body = b'{"inputs": "a", "parameters": {"max_new_tokens": 2}}\n{broken\n"plain string"\n'
    r = server.post("/invocations", body, content_type="application/jsonlines")
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/jsonlines"
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert len(lines) == 3
    assert lines[0]["details"]["generated_tokens"] == 2
    assert lines[1]["status"] == 400 and "error" in lines[1]
    assert "generated_text" in lines[2]


def test_errors_are_json_with_status(server):
    assert server.post("/invocations", b"{", headers={ATTR: "x"}).status_code == 400
    r = server.post("/invocations", b"a,b", content_type="text/csv", headers={ATTR: "x"})
    assert r.status_code == 415 and r.json()["error_type"] == "unsupported_media_type" and r.headers[ATTR] == "x"
    r = server.post("/invocations", {"inputs": "x", "parameters": {"bogus": 1}})
    assert r.status_code == 422 and "bogus" in r.json()["error"]
    r = server.post("/invocations", b"x" * (6 * 1024 * 1024 + 1))
    assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"


def test_413_reaches_a_client_that_writes_the_whole_body_first(server):
    # urllib and many HTTP/1.1 clients send the whole body before reading: they must get the 413 JSON,
    # not a broken pipe from a connection closed while they were still uploading.
    body = b'{"inputs": "' + b"x" * (8 * 1024 * 1024) + b'"}'
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        sock.sendall(body)  # BrokenPipeError here on the old main
        head, _, rest = _read_response(sock)
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(rest)["error_type"] == "payload_too_large"


def _read_response(sock) -> tuple[bytes, bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))
    while len(rest) < length:
        rest += sock.recv(65536)
    return head, b"", rest


def test_custom_inference_py_overrides_output(server):
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
    r = server.post("/invocations", body, headers={"Accept": "application/x-wrapped"})
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/x-wrapped")
    assert r.json()["wrapped"][0]["details"]["generated_tokens"] == 2
    assert "wrapped" not in server.post("/invocations", body).text


def test_ping_answers_while_16_streams_generate(server):
    results, errors = [], []

    def stream_one(i):
        try:
            # near-uniform sampling over the random model: long generations, rarely cut short by EOS
            r = server.post("/invocations", {"inputs": f"stream {i}", "stream": True, "parameters": {
                "max_new_tokens": 80, "do_sample": True, "temperature": 5.0, "seed": i}}, stream=True, timeout=300)
            events = [json.loads(e) for e in iter_sse(r)]
            results.append(events[-1]["details"]["generated_tokens"] == len(events))
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=stream_one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    pings, running = [], []
    while any(t.is_alive() for t in threads) and len(pings) < 40:
        t0 = time.monotonic()
        r = requests.get(server.url + "/ping", timeout=2)  # SageMaker's own limit
        pings.append((r.status_code, time.monotonic() - t0))
        metrics = requests.get(server.url + "/metrics", timeout=2).text
        running.append(float(re.search(r"^granite_running_sequences ([\d.]+)$", metrics, re.M).group(1)))
        time.sleep(0.05)
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert results == [True] * 16
    assert pings and all(code == 200 for code, _ in pings), pings
    assert max(running) >= 8, running  # the pings above really were answered under load
    metrics = requests.get(server.url + "/metrics", timeout=2).text
    assert "granite_free_slots 16.0" in metrics and "granite_queue_depth 0.0" in metrics


def test_client_disconnect_cancels_generation(server):
    def cancelled() -> int:
        text = requests.get(server.url + "/metrics", timeout=5).text
        return float(re.search(r'^granite_engine_finished_total\{reason="cancelled"\} ([\d.]+)$', text, re.M).group(1))

    before = cancelled()
    body = json.dumps({"inputs": "go on", "stream": True, "parameters": {
        "max_new_tokens": 400, "do_sample": True, "temperature": 5.0, "seed": 3}}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        seen = b""
        while b"data:" not in seen:
            seen += sock.recv(4096)
    # the client has vanished mid-stream
    deadline = time.monotonic() + 30
    while cancelled() == before:
        assert time.monotonic() < deadline, "the server kept generating for a client that left"
        time.sleep(0.1)
    text = requests.get(server.url + "/metrics", timeout=5).text
    assert "granite_free_slots 16.0" in text and "granite_client_disconnects_total 1.0" in text


def test_client_that_leaves_a_jsonlines_request_cancels_every_record(server):
    # Non-streaming: nothing is written until the answer, so only watching the socket notices the hang-up.
    def metric(pattern: str) -> int:
        text = requests.get(server.url + "/metrics", timeout=5).text
        return float(re.search(pattern, text, re.M).group(1))

    def finished(reason: str) -> float:
        return metric(rf'^granite_engine_finished_total\{{reason="{reason}"\}} ([\d.]+)$')

    before = {r: finished(r) for r in ("cancelled", "eos_token", "length")}
    gone = metric(r"^granite_client_disconnects_total ([\d.]+)$")
    records = 20  # 16 slots running + 4 waiting
    body = b"".join(json.dumps({"inputs": f"record {i}", "parameters": {
        "max_new_tokens": 400, "do_sample": True, "temperature": 5.0, "seed": i}}).encode() + b"\n"
        for i in range(records))
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/jsonlines\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while metric(r"^granite_running_sequences ([\d.]+)$") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    deadline = time.monotonic() + 20

    def ended() -> dict:
        return {r: finished(r) - before[r] for r in before}

    # every record ends: cancelled at the hang-up, or (sampled at temperature 5) an early end-of-text before it;
    # none runs to its 400 tokens for nobody, as on the old main
    while sum(ended().values()) < records:
        assert time.monotonic() < deadline, f"records ended so far: {ended()}"
        time.sleep(0.1)
    assert ended()["length"] == 0 and ended()["cancelled"] >= records - 4, ended()
    while metric(r"^granite_client_disconnects_total ([\d.]+)$") < gone + 1:  # counted as its view returns
        assert time.monotonic() < deadline, "the hang-up was not counted"
        time.sleep(0.1)
    assert metric(r"^granite_free_slots ([\d.]+)$") == 16


def test_one_scrape_reports_every_worker(tiny_ckpt, tmp_path):
    # Two gunicorn workers (two engine replicas): whichever answers /metrics reports the instance.
    srv = ServerProcess({"MODEL_DIR": str(tiny_ckpt), "SAGEMAKER_MODEL_SERVER_WORKERS": "2",
                         "MAX_CONCURRENT_SEQS": "3", "MAX_TOTAL_TOKENS": "256"}, tmp_path / "two.log")
    try:
        srv.wait_ready()
        deadline = time.monotonic() + 120
        while "granite_ready 1.0" not in requests.get(srv.url + "/metrics", timeout=5).text:  # both loaded
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.2)
        for i in range(6):
            with requests.Session() as s:  # a new connection each: the requests spread over the workers
                r = s.post(srv.url + "/invocations", json={"inputs": f"hi {i}", "parameters": {"max_new_tokens": 2}})
                assert r.status_code == 200
        time.sleep(1.5)  # each worker copies its engine's numbers every second
        for _ in range(6):
            with requests.Session() as s:
                text = s.get(srv.url + "/metrics", timeout=5).text
            assert "granite_total_slots 6.0" in text, text  # 2 x 3 slots; the old main showed one worker's 3
            assert 'granite_requests_total{route="/invocations",status="200"} 6.0' in text, text
            assert "granite_engine_generated_tokens_total 12.0" in text, text
    finally:
        srv.stop()


def test_demo_model_says_so(tmp_path):
    # `make serve` with no model: MODEL_ID=demo, built into MODEL_CACHE_DIR; name and log say DEMO.
    srv = ServerProcess({"MODEL_ID": "demo", "MODEL_CACHE_DIR": str(tmp_path / "cache"), "MODEL_DIR": str(tmp_path)},
                        tmp_path / "demo.log")
    try:
        srv.wait_ready()
        name = requests.get(srv.url + "/v1/models", timeout=5).json()["data"][0]["id"]
        assert "demo" in name.lower() and "random" in name.lower()
        r = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.json()["model"] == name
    finally:
        assert srv.stop() == 0
    assert "RANDOM WEIGHTS" in srv.log()


def test_sigterm_lets_the_request_in_flight_finish(server):
    r = server.post("/invocations", {"inputs": "last one", "stream": True, "parameters": {"max_new_tokens": 40}},
                    stream=True)
    events = iter_sse(r)
    first = json.loads(next(events))
    assert first["index"] == 0
    server.proc.send_signal(signal.SIGTERM)
    rest = [json.loads(e) for e in events]
    assert rest[-1]["details"]["generated_tokens"] == 40 and rest[-1]["details"]["finish_reason"] == "length"
    assert server.proc.wait(40) == 0, server.log()
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url + "/ping", timeout=2)


def test_sigterm_ends_a_stream_that_cannot_finish_with_an_error_event(tiny_ckpt, tmp_path):
    """A stream still running when the drain deadline (GRACEFUL_TIMEOUT - 3 s) passes gets a final
    error event and the process exits 0: the client is told, never silently cut off."""
    proc = ServerProcess(dict(MODEL_DIR=str(tiny_ckpt), GRACEFUL_TIMEOUT="4", MAX_TOTAL_TOKENS="200000",
                              MAX_INPUT_TOKENS="1000"), tmp_path / "server.log")
    try:
        proc.wait_ready()
        r = proc.post("/invocations", {"inputs": "go on and on", "stream": True,
                                       "parameters": {"max_new_tokens": 150000}}, stream=True)
        events = iter_sse(r)
        json.loads(next(events))
        proc.proc.send_signal(signal.SIGTERM)
        last = json.loads(list(events)[-1])
        assert last.get("error_type") == "generation_error" and "shut down" in last["error"], last
        assert proc.proc.wait(30) == 0, proc.log()
    finally:
        proc.stop()
