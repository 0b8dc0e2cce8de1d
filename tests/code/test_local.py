"""code/granite_sm/local.py: the LOCAL-mode helpers (environment, failure reporting, throughput sweep).
The happy path (demo server, batch CLI) runs in tests/test_notebook.py."""

import threading

import pytest

from tests.sdk_helpers import load

local = load("local")


def test_server_env_drops_inherited_model_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("MODEL_DIR", "/somewhere/else")
    monkeypatch.setenv("MAX_CONCURRENT_SEQS", "1")
    monkeypatch.setenv("SAGEMAKER_BIND_TO_PORT", "9999")
    monkeypatch.setenv("HF_MODEL_ID", "someone/else")
    env = local.server_env(cache_dir=str(tmp_path), extra={"MAX_NEW_TOKENS": 16})
    assert env["MODEL_ID"] == "demo" and env["MODEL_CACHE_DIR"] == str(tmp_path) and env["MAX_NEW_TOKENS"] == "16"
    assert env["MODEL_DIR"] != "/somewhere/else"
    assert not {"MAX_CONCURRENT_SEQS", "SAGEMAKER_BIND_TO_PORT", "HF_MODEL_ID"} & set(env)
    env = local.server_env(model_dir=str(tmp_path / "ckpt"))
    assert env["MODEL_DIR"] == str(tmp_path / "ckpt") and "MODEL_ID" not in env


def test_server_that_cannot_start_reports_its_log(tmp_path):
    srv = local.LocalServer(cache_dir=str(tmp_path), env={"DTYPE": "float8"}, log_path=tmp_path / "log").start()
    with pytest.raises(RuntimeError, match="DTYPE"):
        srv.wait_ready(timeout_s=60)
    assert srv.stop() == 2


def test_throughput_sweep_runs_each_level_concurrently():
    active, peak, lock = [0], {}, threading.Lock()
    barrier_hits = []

    def fake_generate(prompt, max_new_tokens):
        with lock:
            active[0] += 1
            peak[level[0]] = max(peak.get(level[0], 0), active[0])
            barrier_hits.append(prompt)
        threading.Event().wait(0.02)
        with lock:
            active[0] -= 1
        return max_new_tokens

    level = [0]
    rows = []
    for c in (1, 4):
        level[0] = c
        rows += local.throughput_sweep(fake_generate, ["a", "b", "c"], [c], max_new_tokens=5)
    assert [(r["concurrency"], r["requests"], r["tokens"]) for r in rows] == [(1, 2, 10), (4, 8, 40)]
    assert peak[1] == 1 and peak[4] > 1
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert barrier_hits[:2] == ["a", "b"] and barrier_hits[2:].count("a") == 3


def test_simulate_transform_packs_whole_lines_under_the_payload_limit(tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [f'{{"inputs": "record {i}"}}' for i in range(7)]
    src.write_text("\n".join(lines) + "\n\n")
    bodies = []

    def post(body: bytes) -> bytes:  # answers one line per line, like the server
        bodies.append(body)
        return b"".join(b'{"n": %d}\n' % len(x) for x in body.splitlines())

    limit_mb = 60 / 2**20  # 60 bytes: two 23-byte lines per request
    (out,) = local.simulate_transform(post, [src], tmp_path / "out", max_payload_mb=limit_mb)
    assert out.name == "in.jsonl.out"
    assert [len(b.splitlines()) for b in bodies] == [2, 2, 2, 1]
    assert all(len(b) <= 60 for b in bodies)
    assert b"".join(bodies).decode().splitlines() == lines
    assert len(out.read_text().splitlines()) == 7
