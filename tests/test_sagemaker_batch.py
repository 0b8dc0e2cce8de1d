"""Play SageMaker batch transform against the real server (`python -m serve serve`, tiny checkpoint):
GET /execution-parameters, split a JSON Lines file into MultiRecord payloads, post them concurrently,
join the responses and check one line per input line, in order."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

requests = pytest.importorskip("requests")

ROOT = Path(__file__).resolve().parents[1]
JSONL = "application/jsonlines"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "HF_", "MODEL_"))}
    env.update(MODEL_DIR=str(tiny_ckpt), PORT=str(port), HOST="127.0.0.1", SAGEMAKER_BATCH="True",
               MAX_NEW_TOKENS="4", MAX_CONCURRENT_SEQS="8", DEVICE="cpu",
               MODEL_CACHE_DIR=str(tmp_path_factory.mktemp("cache")))
    log = tmp_path_factory.mktemp("srv") / "server.log"
    with open(log, "wb") as out:
        p = subprocess.Popen([sys.executable, "-m", "serve", "serve"], cwd=ROOT, env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert p.poll() is None, f"server exited: {log.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"server never got ready: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield url
    finally:
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def split_multi_record(lines: list[bytes], max_bytes: int) -> list[list[bytes]]:
    """SageMaker SplitType=Line + BatchStrategy=MultiRecord: consecutive records packed into payloads
    of at most max_bytes (a record larger than that on its own would fail the job)."""
    payloads, cur, size = [], [], 0
    for ln in lines:
        n = len(ln) + 1
        assert n <= max_bytes
        if cur and size + n > max_bytes:
            payloads.append(cur)
            cur, size = [], 0
        cur.append(ln)
        size += n
    if cur:
        payloads.append(cur)
    return payloads


def post_lines(url: str, lines: list[bytes]) -> list[bytes]:
    r = requests.post(f"{url}/invocations", data=b"\n".join(lines) + b"\n",
                      headers={"Content-Type": JSONL, "Accept": JSONL}, timeout=600)
    assert r.status_code == 200, r.text[:500]
    body = r.content
    assert body.endswith(b"\n")
    return body[:-1].split(b"\n")


def test_execution_parameters(server):
    r = requests.get(f"{server}/execution-parameters", timeout=5)
    assert r.status_code == 200
    p = r.json()
    assert p["BatchStrategy"] == "MULTI_RECORD" and p["MaxPayloadInMB"] == 6
    assert p["MaxConcurrentTransforms"] >= 1


def test_multirecord_transform_one_line_per_input_line_in_order(server):
    params = requests.get(f"{server}/execution-parameters", timeout=5).json()
    lines = []
    for i in range(48):
        if i % 11 == 5:
            lines.append(b"{broken json")
        elif i % 13 == 7:
            lines.append(json.dumps(f"bare prompt {i}").encode())
        else:
            body = {"inputs": f"record {i}: tell me about {i * 7}", "parameters": {"max_new_tokens": 1 + i % 4}}
            lines.append(json.dumps(body).encode())
    # MaxPayloadInMB (6) would put all 48 small records into one payload; a small cap here makes
    # SageMaker's packing produce several payloads of several records each, as a big file would.
    max_bytes = min(params["MaxPayloadInMB"] * 1024 * 1024, 700)
    payloads = split_multi_record(lines, max_bytes)
    assert len(payloads) > 3 and any(len(p) > 1 for p in payloads)
    with ThreadPoolExecutor(max_workers=params["MaxConcurrentTransforms"]) as pool:
        joined = [ln for part in pool.map(lambda p: post_lines(server, p), payloads) for ln in part]
    assert len(joined) == len(lines)  # AssembleWith=Line: exactly one output line per input line
    # each output line is the answer to its own input line: compare with that line sent alone
    with ThreadPoolExecutor(max_workers=4) as pool:
        singles = list(pool.map(lambda ln: post_lines(server, [ln]), lines))
    for i, (got, single) in enumerate(zip(joined, singles, strict=True)):
        assert [got] == single, f"line {i}"
        obj = json.loads(got)
        if lines[i] == b"{broken json":
            assert obj["status"] == 400 and "error" in obj
        else:
            assert "error" not in obj, obj
    ok = [json.loads(x) for x in joined if b'"error"' not in x]
    assert ok and all(_generated_tokens(o) >= 1 for o in ok)


def test_multirecord_empty_line_keeps_its_place(server):
    lines = [json.dumps({"inputs": "a"}).encode(), b"", json.dumps({"inputs": "b"}).encode()]
    out = post_lines(server, lines)
    assert len(out) == 3
    assert "error" in json.loads(out[1]) and "error" not in json.loads(out[0]) and "error" not in json.loads(out[2])


def _generated_tokens(obj) -> int:
    if isinstance(obj, list):
        return sum(_generated_tokens(o) for o in obj)
    if "usage" in obj:
        return obj["usage"]["completion_tokens"]
    return obj["details"]["generated_tokens"]
