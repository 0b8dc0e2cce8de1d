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
import requests

ROOT = Path(__file__).resolve().parents[2]
JSONL = "application/jsonlines"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "HF_", "MODEL_"))}


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    port = _free_port()
    env = base_env()
    # what SageMaker sets for a transform job (SDK local mode spells SAGEMAKER_BATCH "True")
    env.update(SAGEMAKER_BATCH="True", SAGEMAKER_MAX_CONCURRENT_TRANSFORMS="6", SAGEMAKER_MAX_PAYLOAD_IN_MB="3",
               SAGEMAKER_BATCH_STRATEGY="multi_record")
    env.update(MODEL_DIR=str(tiny_ckpt), PORT=str(port), HOST="127.0.0.1", OMP_NUM_THREADS="1",
               MAX_NEW_TOKENS="4", MAX_CONCURRENT_SEQS="8", MAX_QUEUED_REQUESTS="16", DEVICE="cpu",
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
    assert p == {"BatchStrategy": "MULTI_RECORD", "MaxPayloadInMB": 3, "MaxConcurrentTransforms": 6}


def mixed_lines(n: int) -> list[bytes]:
    lines = []
    for i in range(n):
        if i % 11 == 5:
            lines.append(b"{broken json")
        elif i % 13 == 7:
            lines.append(json.dumps(f"bare prompt {i}").encode())
        else:
            body = {"inputs": f"record {i}: tell me about {i * 7}", "parameters": {"max_new_tokens": 1 + i % 4}}
            lines.append(json.dumps(body).encode())
    return lines


def test_multirecord_transform_one_line_per_input_line_in_order(server):
    params = requests.get(f"{server}/execution-parameters", timeout=5).json()
    lines = mixed_lines(48)
    # MaxPayloadInMB (3) would put all 48 small records into one payload; a small cap here makes
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


def test_multirecord_payload_larger_than_the_engine_queue(server):
    # 8 slots + 16 queued: a 100-record payload must still answer every line (no 429 lines)
    lines = [json.dumps({"inputs": f"many {i}", "parameters": {"max_new_tokens": 1}}).encode() for i in range(100)]
    out = [json.loads(x) for x in post_lines(server, lines)]
    assert len(out) == 100 and all("error" not in o for o in out)
    assert all(_generated_tokens(o) == 1 for o in out)


def _generated_tokens(obj) -> int:
    if isinstance(obj, list):
        return sum(_generated_tokens(o) for o in obj)
    if "usage" in obj:
        return obj["usage"]["completion_tokens"]
    return obj["details"]["generated_tokens"]


def test_offline_batch_writes_the_bytes_the_server_returns(server, tiny_ckpt, tmp_path):
    """`python -m serve batch` on a file == the server's MultiRecord answer for the same lines (greedy)."""
    lines = mixed_lines(30)
    src = tmp_path / "in" / "part-0001.jsonl"
    src.parent.mkdir()
    src.write_bytes(b"\n".join(lines) + b"\n")
    env = {**base_env(), "MAX_NEW_TOKENS": "4", "DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "serve", "batch", "--input", str(src.parent), "--output",
                        str(tmp_path / "out"), "--model-dir", str(tiny_ckpt), "--progress", "none"],
                       cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    summary = json.loads(r.stdout.decode().strip().splitlines()[-1])
    assert summary["records"] == 30 and summary["errors"] == 3
    served = post_lines(server, lines)
    assert (tmp_path / "out" / "part-0001.jsonl.out").read_bytes() == b"".join(x + b"\n" for x in served)
