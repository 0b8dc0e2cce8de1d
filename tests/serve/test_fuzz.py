"""Hostile bodies against /invocations and /v1/*: never a 5xx, always a JSON error, and afterwards a live
server whose slot pool is completely free. Hypothesis drives the Flask app on the real engine (tiny
checkpoint, max_new_tokens <= 3); a final round hits a real gunicorn process over HTTP and raw sockets."""

import json
import socket
import time
from collections import Counter

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server_helpers import ServerProcess, ready_app

pytestmark = pytest.mark.slow  # a real gunicorn process + model load: ~30-60 s on 2 cores
ENV = {"MAX_CONCURRENT_SEQS": "4", "MAX_QUEUED_REQUESTS": "8", "MAX_INPUT_TOKENS": "128", "MAX_TOTAL_TOKENS": "136",
       "MAX_NEW_TOKENS": "2", "DEVICE": "cpu", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "1"}
LIMIT = 1024 * 1024
FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

# ---- strategies ----
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                    st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
small_new = st.one_of(st.integers(1, 3), st.integers(-5, 0), st.integers(10**3, 10**40), json_values)
prompt = st.one_of(st.text(min_size=1, max_size=40), st.just(""), st.lists(st.text(max_size=10), max_size=3),
                   json_values)
num = st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=32), st.integers(-3, 300),
               st.integers(0, 10**7), json_values)
TGI_KEYS = {"temperature": num, "top_k": num, "top_p": num, "typical_p": num, "do_sample": json_values,
            "seed": st.one_of(st.integers(-(2**65), 2**65), json_values), "repetition_penalty": num,
            "frequency_penalty": num, "stop": st.one_of(st.lists(st.text(max_size=3), max_size=3), json_values),
            "truncate": num, "return_full_text": json_values, "details": st.booleans(), "top_n_tokens": num,
            "decoder_input_details": json_values, "best_of": num, "watermark": json_values, "bogus": json_values}
tgi_params = st.fixed_dictionaries({"max_new_tokens": small_new},
                                   optional={k: v for k, v in TGI_KEYS.items()})
tgi_bodies = st.fixed_dictionaries({"inputs": prompt}, optional={"parameters": st.one_of(tgi_params, json_values),
                                                                 "stream": json_values, "extra": json_values})
message = st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                           "content": st.one_of(st.text(max_size=20), json_values)},
                                          optional={"tool_calls": json_values, "name": json_values}), json_values)
chat_bodies = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(message, max_size=3), json_values)},
    optional={"max_tokens": small_new, "temperature": num, "top_p": num, "stop": json_values, "seed": num,
              "n": num, "stream": st.booleans(), "stream_options": json_values, "tools": json_values,
              "tool_choice": json_values, "documents": json_values, "logprobs": json_values, "top_logprobs": num,
              "response_format": json_values, "presence_penalty": num, "model": json_values, "odd": json_values})
completion_bodies = st.fixed_dictionaries({"prompt": prompt}, optional={
    "max_tokens": small_new, "echo": json_values, "logprobs": num, "stream": st.booleans(), "suffix": json_values})
content_types = st.sampled_from(["application/json", "application/json; charset=utf-8", "application/jsonlines",
                                 "text/csv", "application/octet-stream", "", "text/plain", "multipart/form-data",
                                 "application/x-www-form-urlencoded", "image/png"])
hostile_text = st.one_of(
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.sampled_from(['{"inputs": NaN}', '{"inputs": "x", "parameters": {"temperature": Infinity}}',
                     '{"inputs": "x", "parameters": {"max_new_tokens": 1e999}}', '{"inputs": "x"' + " " * 100,
                     '{"inputs": "\\ud800"}', '{"inputs": "x", "parameters": {"seed": ' + "9" * 5000 + "}}",
                     '{"inputs": "x", "inputs": 5}', "null", "[]", '""', '"\\u0000"']),
)


STATUSES: Counter = Counter()


def check(response) -> None:
    body = response.get_data()  # consumes a stream to the end
    STATUSES[response.status_code] += 1
    assert response.status_code < 500, (response.status_code, body[:300])
    if response.status_code >= 400:
        err = json.loads(body)
        assert err["error"] and err["error_type"], err
    elif response.mimetype == "text/event-stream":
        events = body.decode().split("\n\n")
        assert events[-1] == "" and all(e.startswith("data:") for e in events[:-1]), body[:300]
        assert not any('"error_type"' in e for e in events), body[-300:]  # no generation failed mid-stream
    else:
        for line in body.decode().splitlines():
            obj = json.loads(line)
            if isinstance(obj, dict) and "status" in obj:
                assert obj["status"] < 500, obj


@pytest.fixture(scope="module")
def client(tiny_ckpt):
    _, c, engine = ready_app(tiny_ckpt, ENV, "fuzz")
    yield c
    # the end state the whole module is about: alive, nothing running, every slot back in the pool
    assert c.get("/ping").status_code == 200
    s = engine.stats()
    deadline = time.monotonic() + 20
    while (s["free_slots"], s["running"], s["waiting"]) != (s["total_slots"], 0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
        s = engine.stats()
    assert (s["free_slots"], s["running"], s["waiting"]) == (s["total_slots"], 0, 0), s
    assert s["step_errors_total"] == 0 and s["finished_total"]["error"] == 0, s
    engine.shutdown(timeout=5)
    print("fuzz statuses:", dict(STATUSES))
    if sum(STATUSES.values()) >= 6 * FUZZ.max_examples:  # the whole module ran (not a -k subset)
        assert STATUSES[200] >= 100  # the generation paths were exercised, not only the validators


@FUZZ
@given(body=json_values)
def test_random_json(client, body):
    check(client.post("/invocations", data=json.dumps(body), content_type="application/json"))


@FUZZ
@given(body=tgi_bodies)
def test_tgi_shaped(client, body):
    check(client.post("/invocations", data=json.dumps(body), content_type="application/json"))


@FUZZ
@given(body=chat_bodies, route=st.sampled_from(["/invocations", "/v1/chat/completions"]))
def test_chat_shaped(client, body, route):
    check(client.post(route, data=json.dumps(body), content_type="application/json"))


@FUZZ
@given(body=completion_bodies, route=st.sampled_from(["/invocations", "/v1/completions"]))
def test_completion_shaped(client, body, route):
    check(client.post(route, data=json.dumps(body), content_type="application/json"))


@FUZZ
@given(raw=st.one_of(st.binary(max_size=200), hostile_text.map(str.encode)), ctype=content_types,
       route=st.sampled_from(["/invocations", "/invocations", "/v1/chat/completions", "/v1/completions"]))
def test_raw_bytes_and_content_types(client, raw, ctype, route):
    check(client.post(route, data=raw, content_type=ctype or None))


@FUZZ
@given(lines=st.lists(st.one_of(tgi_bodies.map(json.dumps), chat_bodies.map(json.dumps), st.binary(max_size=30)
                                .map(lambda b: b.decode("latin-1")), st.text(max_size=20)), max_size=6))
def test_jsonlines(client, lines):
    body = "\n".join(line.replace("\n", " ") for line in lines).encode("utf-8", "surrogatepass")
    r = client.post("/invocations", data=body, content_type="application/jsonlines")
    check(r)
    if r.status_code == 200:
        expected = len(lines) - (1 if lines and not lines[-1].strip() else 0)  # a final blank line is no record
        assert len(r.get_data().decode().splitlines()) == expected


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(size=st.integers(LIMIT - 2000, LIMIT + 2000), kind=st.sampled_from(["inputs", "messages", "raw"]))
def test_giant_bodies_near_the_limit(client, size, kind):
    shells = {"inputs": '{"inputs": "%s"}', "messages": '{"messages": [{"role": "user", "content": "%s"}]}',
              "raw": "%s"}
    shell = shells[kind]
    body = shell % ("ab " * size)[: size - len(shell) + 2]  # exactly `size` bytes of valid JSON (or raw text)
    assert len(body) == size
    check(client.post("/invocations", data=body, content_type="application/json"))


# ---- the real process: hostile HTTP, then alive with free slots ----

def raw_http(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_process_survives_hostile_http(tiny_ckpt, tmp_path):
    srv = ServerProcess({"MODEL_DIR": str(tiny_ckpt), **ENV}, tmp_path / "server.log")
    try:
        srv.wait_ready()
        bad = [
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{\xff\xfe",
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + (b"100000\r\n" + b"a" * 0x100000 + b"\r\n") * 2 + b"0\r\n\r\n",
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n{}",
            b"GARBAGE\r\n\r\n",
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n"
            b'{"inputs":"x","stream":true}',  # short body: the client gives up mid-request
        ]
        for payload in bad:
            reply = raw_http(srv.port, payload)
            if reply:
                status = int(reply.split(b" ", 2)[1])
                assert status < 500, reply[:300]
        for body, ctype in [(b'{"inputs": "hi", "parameters": {"max_new_tokens": 2}}', "application/json"),
                            (b"[" * 5000, "application/json"), (b'{"inputs": 1e999}', "application/json"),
                            (b'"a"\n{bad\n', "application/jsonlines"), (b"\x00\x01", "image/png")]:
            r = srv.post("/invocations", body, content_type=ctype)
            assert r.status_code < 500, r.text
        r = srv.post("/invocations", {"inputs": "x", "stream": True, "parameters": {"max_new_tokens": 3}}, stream=True)
        r.raw.read(10)
        r.close()  # disconnect mid-stream
        deadline = time.monotonic() + 20
        while True:
            metrics = requests.get(srv.url + "/metrics", timeout=5).text
            if "granite_free_slots 4.0" in metrics and "granite_running_sequences 0.0" in metrics:
                break
            assert time.monotonic() < deadline, metrics
            time.sleep(0.1)
        assert requests.get(srv.url + "/ping", timeout=2).status_code == 200
    finally:
        assert srv.stop() == 0, srv.log()
