"""Signed checkpoints through the real entrypoints: `python -m serve serve` (gunicorn) and
`python -m serve batch`, one process each per case of tests/serve/signing_cases.py, all started at
once (the failures stop before any weight loads, so they cost an interpreter start each).

A good signature (key, certificate chain) verifies and serves; each tampering refuses with its own
reason: the server stays up, /ping and /invocations answer 503 with the reason in the body; batch
exits 2 with the reason on stderr and writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import requests

from tests.serve.signing_cases import build_cases
from tests.server_helpers import ROOT, ServerProcess

pytestmark = pytest.mark.slow
LIMITS = {"MAX_CONCURRENT_SEQS": "2", "MAX_QUEUED_REQUESTS": "4", "MAX_INPUT_TOKENS": "64", "MAX_TOTAL_TOKENS": "96",
          "MAX_NEW_TOKENS": "4", "DEVICE": "cpu"}
NAMES = ["key_ok", "cert_ok", "flipped_byte", "extra_file", "removed_file", "wrong_key", "foreign_ca",
         "unsigned_require"]


@pytest.fixture(scope="module")
def setup(tiny_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("signing-procs")
    (tmp / "in").mkdir()
    (tmp / "in" / "records.jsonl").write_text(json.dumps({"inputs": "hello"}) + "\n")
    cases = build_cases(tiny_ckpt, tmp / "models")
    envs = {name: {**LIMITS, "MODEL_CACHE_DIR": str(tmp / "cache" / name), **cases[name].env} for name in NAMES}
    return tmp, cases, envs


@pytest.fixture(scope="module")
def servers(setup):
    tmp, cases, envs = setup
    procs = {name: ServerProcess({**envs[name], "MODEL_DIR": str(cases[name].model_dir)}, tmp / f"{name}.log")
             for name in NAMES}
    yield procs
    for srv in procs.values():
        srv.stop()


@pytest.fixture(scope="module")
def batches(setup):
    # started once the servers are done (the server tests run first): 16 interpreters at once would
    # starve a 2-core machine
    tmp, cases, envs = setup
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "MAX_", "MODEL_"))}
    procs = {}
    for name in NAMES:
        out = tmp / "out" / name
        procs[name] = (out, subprocess.Popen(
            [sys.executable, "-m", "serve", "batch", "--input", str(tmp / "in"), "--output", str(out),
             "--model-dir", str(cases[name].model_dir), "--progress", "none"],
            cwd=ROOT, env={**base, **envs[name]}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    yield procs
    for _, proc in procs.values():
        if proc.poll() is None:
            proc.kill()


def settle(srv: ServerProcess, timeout: float = 300.0) -> tuple[int, str]:
    """(status, reason) of /ping once loading has ended: 200 ready, or 503 with the failure."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert srv.proc.poll() is None, f"server exited {srv.proc.returncode}:\n{srv.log()}"
        try:
            r = requests.get(srv.url + "/ping", timeout=10)
        except (requests.ConnectionError, requests.Timeout):  # not listening yet / a busy 2-core machine
            time.sleep(0.3)
            continue
        if r.status_code == 200:
            return 200, ""
        assert r.status_code == 503, r.text
        if "still loading" not in r.json()["error"]:
            return 503, r.json()["error"]
        time.sleep(0.3)
    raise AssertionError(f"still loading after {timeout}s:\n{srv.log()}")


@pytest.mark.parametrize("name", NAMES)
def test_server(setup, servers, name):
    case, srv = setup[1][name], servers[name]
    status, reason = settle(srv)
    if case.refusal is None:
        assert status == 200, reason
        r = srv.post("/invocations", {"inputs": "hello", "parameters": {"max_new_tokens": 3, "details": True}})
        assert r.status_code == 200 and r.json()[0]["details"]["generated_tokens"] == 3, r.text
        assert "model signature verified" in srv.log()
        return
    assert status == 503 and case.refusal in reason, reason
    r = srv.post("/invocations", {"inputs": "hello"})
    assert r.status_code == 503 and case.refusal in r.json()["error"], r.text
    assert requests.get(srv.url + "/ping", timeout=2).status_code == 503  # stays refused
    assert case.refusal in srv.log()


@pytest.mark.parametrize("name", NAMES)
def test_batch(setup, batches, name):
    case, (out, proc) = setup[1][name], batches[name]
    stdout, stderr = proc.communicate(timeout=300)
    if case.refusal is None:
        assert proc.returncode == 0, stderr[-3000:]
        (line,) = (out / "records.jsonl.out").read_text().splitlines()
        assert isinstance(json.loads(line)["generated_text"], str), line
        assert "model signature verified" in stderr
        return
    assert proc.returncode == 2, (proc.returncode, stderr[-3000:])
    assert case.refusal in stderr, stderr[-3000:]
    assert not (out / "records.jsonl.out").exists()
