"""A real server with 2 gunicorn workers (two engines) and adapters: 3 registered by POST /adapters (each lands on
one worker; the shared registry carries it to the other), each invoked through the SageMaker header and through
OpenAI `model` on new connections (spread over both workers: the same tokens everywhere, and the adapter's, not
the base's), streamed; one deleted while a stream on it runs: the stream finishes, new requests get 404 on every
worker, and every worker frees it (its pool reports 2 adapters, none in use)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from serve.adapters import ADAPTER_HEADER
from tests.lora_helpers import ADAPTERS, make_adapter
from tests.server_helpers import ServerProcess, iter_sse


@pytest.fixture(scope="module")
def srv(tiny_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adproc")
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        make_adapter(tiny_ckpt, tmp / "ad" / name, seed=i, **kw)
    s = ServerProcess({"MODEL_DIR": str(tiny_ckpt), "SAGEMAKER_MODEL_SERVER_WORKERS": "2", "MAX_CONCURRENT_SEQS": "4",
                       "MAX_TOTAL_TOKENS": "512", "MAX_LORAS": "2", "MAX_LORA_RANK": "8",
                       "ADAPTER_SRC_ROOTS": str(tmp / "ad"), "MODEL_CACHE_DIR": str(tmp / "cache")}, tmp / "srv.log")
    s.ad = tmp / "ad"
    try:
        deadline = time.monotonic() + 300
        while not _both_ready(s):  # both workers loaded (tolerant of a loaded machine: 30 s per ping)
            assert time.monotonic() < deadline and s.proc.poll() is None, s.log()
            time.sleep(0.5)
        yield s
    finally:
        s.stop()


def _both_ready(srv) -> bool:
    try:
        return all(_new(srv, "GET", "/ping", timeout=30).status_code == 200 for _ in range(8))
    except requests.RequestException:
        return False


def _new(srv, method, path, **kw):
    with requests.Session() as s:  # a new connection each time: gunicorn spreads them over the workers
        return s.request(method, srv.url + path, **{"timeout": 120, **kw})


def _ids(srv, prompt, headers=None, n=8):
    r = _new(srv, "POST", "/invocations", headers=headers or {},
             json={"inputs": prompt, "parameters": {"max_new_tokens": n, "details": True}})
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()[0]["details"]["tokens"]]


def test_register_invoke_stream_and_delete_across_two_workers(srv):
    for name in ADAPTERS:
        r = _new(srv, "POST", "/adapters", json={"name": name, "src": str(srv.ad / name), "preload": True})
        assert r.status_code == 200, r.text
    assert _new(srv, "POST", "/adapters", json={"name": "fr", "src": str(srv.ad / "fr")}).status_code == 409
    prompt = "a b c d e f g"
    base = _ids(srv, prompt)
    got = {}
    for name in ADAPTERS:
        seen = {tuple(_ids(srv, prompt, {ADAPTER_HEADER: name})) for _ in range(4)}
        assert len(seen) == 1, (name, seen)  # both workers (4 new connections) run the same adapter
        got[name] = seen.pop()
        chat = [_new(srv, "POST", "/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": 8,
                                                          "temperature": 0}).json()["choices"][0]["text"]
                for _ in range(3)]
        hdr = _new(srv, "POST", "/v1/completions", headers={ADAPTER_HEADER: name},
                   json={"prompt": prompt, "max_tokens": 8, "temperature": 0}).json()["choices"][0]["text"]
        assert set(chat) == {hdr}, name
    assert got["fr"] != tuple(base) and got["de"] != tuple(base)
    models = [m["id"] for m in _new(srv, "GET", "/v1/models").json()["data"]]
    assert set(models[1:]) == set(ADAPTERS)

    # a long stream on fr, deleted meanwhile
    events, first = [], threading.Event()

    def stream():
        with requests.post(srv.url + "/invocations", headers={ADAPTER_HEADER: "fr"}, stream=True, timeout=120,
                           json={"inputs": prompt, "stream": True, "parameters": {"max_new_tokens": 150}}) as r:
            assert r.status_code == 200
            for ev in iter_sse(r):
                events.append(json.loads(ev))
                first.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(60)
    assert _new(srv, "DELETE", "/adapters/fr").status_code == 200
    for _ in range(4):
        r = _new(srv, "POST", "/invocations", headers={ADAPTER_HEADER: "fr"}, json={"inputs": prompt})
        assert r.status_code == 404 and "'fr'" in r.json()["error"], r.text
    t.join(120)
    assert events and events[-1]["details"] is not None and "error" not in events[-1]  # it finished
    assert [e["token"]["id"] for e in events[:8]] == list(got["fr"])  # on fr's weights to its end
    for _ in range(6):  # both workers: fr gone and freed, nothing in use
        r = _new(srv, "GET", "/adapters").json()
        assert sorted(a["name"] for a in r["adapters"]) == ["de", "ja"]
        assert r["memory"]["entries"] == 2 and all(a["in_use"] == 0 for a in r["adapters"]), r
    assert _ids(srv, prompt, {ADAPTER_HEADER: "de"}) == list(got["de"])
