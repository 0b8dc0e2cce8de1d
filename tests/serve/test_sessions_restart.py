"""Sessions outlive their worker, through real gunicorn: `kill -9` the worker in the middle of a 5-turn session,
gunicorn starts a new one (same index, same disk tier folder), and the next turns, each sending only its new
message, answer exactly what an uninterrupted session answered, resumed from the state saved on disk (cached
tokens, no memory survived the kill). A session closed before the kill stays closed, an expired one stays
expired. Then a truncated and a bit-flipped snapshot file are discarded (counted in /metrics) and the request
falls back to a full prefill with Hugging Face's greedy tokens; the files stay within SNAPSHOT_DISK_BYTES. With two
workers, the other answers a dead worker's sessions 503 (retry) until its successor has loaded them."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import requests

from tests.server_helpers import ServerProcess

pytestmark = pytest.mark.slow  # a server start and a worker restart: ~30-90 s on 2 cores
SID = "X-Amzn-SageMaker-Session-Id"
TTL = 60  # longer than a worker restart takes here (~10-30 s), short enough for one session to expire
DISK_BYTES = 48 << 20


def _workers(master: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split()}


def _post(srv, body, sid):
    return requests.post(srv.url + "/invocations", json=body, headers={SID: sid, "Connection": "close"}, timeout=120)


def _open(srv) -> str:
    r = _post(srv, {"requestType": "NEW_SESSION"}, "NEW_SESSION")
    assert r.status_code == 200, r.text
    return r.headers["X-Amzn-SageMaker-New-Session-Id"].split(";")[0]


def _turn(srv, sid, k):
    r = _post(srv, {"messages": [{"role": "user", "content": f"turn {k}: and then what happened?"}],
                    "max_tokens": 6, "temperature": 0}, sid)
    assert r.status_code == 200, (r.status_code, r.text)
    body = r.json()
    return (body["choices"][0]["message"]["content"], body["usage"]["prompt_tokens"],
            body["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0))


def test_sessions_survive_a_killed_worker(tiny_ckpt, tmp_path):
    folder = tmp_path / "snapshots"
    env = {"MODEL_DIR": str(tiny_ckpt), "SAGEMAKER_MODEL_SERVER_WORKERS": "1", "MAX_CONCURRENT_SEQS": "4",
           "MAX_TOTAL_TOKENS": "2048", "SESSION_TTL": str(TTL), "SNAPSHOT_DISK_DIR": str(folder),
           "SNAPSHOT_DISK_BYTES": str(DISK_BYTES), "SNAPSHOT_HOST_BYTES": "0",
           "SNAPSHOT_DEVICE_SHARE": "0"}  # nothing kept in memory: every snapshot goes to disk, every resume reads one
    srv = ServerProcess(env, tmp_path / "server.log")
    try:
        srv.wait_ready(240)
        idle = _open(srv)  # left idle: expires before the kill
        t_idle = time.monotonic()
        closed = _open(srv)
        assert _turn(srv, closed, 0)[0] is not None
        assert _post(srv, {"requestType": "CLOSE"}, closed).status_code == 200
        # the reference session's last turn ends well after idle's open (on a fast machine the turns take well
        # under a second), so it outlives idle's expiry by more than the keep-alive turn below needs
        time.sleep(max(0.0, t_idle + 10 - time.monotonic()))
        ref_sid = _open(srv)
        reference = [_turn(srv, ref_sid, k) for k in range(5)]  # the uninterrupted run
        time.sleep(max(0.0, t_idle + TTL + 1 - time.monotonic()))
        r = _post(srv, {"inputs": "hello"}, idle)
        assert r.status_code == 410 and "expired" in r.json()["error"], r.text
        assert _turn(srv, ref_sid, 5)[2] > 0  # keeps the reference session from expiring meanwhile
        sid = _open(srv)
        got = [_turn(srv, sid, k) for k in range(2)]

        (old,) = _workers(srv.proc.pid)
        os.kill(old, signal.SIGKILL)  # mid-session: turns 0-1 done, 2-4 to come
        t_kill = time.monotonic()
        deadline = time.monotonic() + 240
        while True:
            assert time.monotonic() < deadline, srv.log()
            new = _workers(srv.proc.pid) - {old}
            if new:
                try:
                    if requests.get(srv.url + "/ping", timeout=5).status_code == 200:
                        break
                except (requests.ConnectionError, requests.Timeout):
                    pass
            time.sleep(0.5)
        assert time.monotonic() - t_kill < TTL - 5, "the restart took longer than the sessions' TTL"

        got += [_turn(srv, sid, k) for k in range(2, 5)]
        assert [g[:2] for g in got] == [r[:2] for r in reference], (got, reference)  # same answers, same prompts
        assert got[2][2] > 0, ("the first turn after the restart resumed from the saved state", got, reference)
        assert srv.metric("granite_prefix_cache_hits_disk_total", 0.0) >= 1
        r = _post(srv, {"messages": [{"role": "user", "content": "still there?"}]}, closed)
        assert r.status_code == 410 and "closed" in r.json()["error"], r.text
        r = _post(srv, {"messages": [{"role": "user", "content": "still there?"}]}, idle)
        assert r.status_code == 410 and "expired" in r.json()["error"], r.text
        assert _turn(srv, ref_sid, 6)[2] > 0  # the other session lives on too
        for s in (sid, ref_sid):
            assert _post(srv, {"requestType": "CLOSE"}, s).status_code == 200
        _damaged_files_fall_back(srv, tiny_ckpt, folder)
        on_disk = sum(f.stat().st_size for f in folder.rglob("*.snap"))
        assert 0 < on_disk <= DISK_BYTES
        assert not list(folder.rglob("pins/*.json"))  # every session closed: no pin left
        assert srv.metric("granite_prefix_cache_bytes{tier=\"disk\"}", 0.0) <= DISK_BYTES
    finally:
        srv.stop()


def _tgi(srv, text):
    r = srv.post("/invocations", {"inputs": text, "parameters": {"max_new_tokens": 5, "details": True}})
    assert r.status_code == 200, r.text
    d = r.json()[0]["details"]
    return [t["id"] for t in d["tokens"]], d["cached_tokens"]


def _damaged_files_fall_back(srv, ckpt, folder: Path):
    import torch
    from transformers import GraniteMoeHybridForCausalLM

    from model.text.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(ckpt)
    hf = GraniteMoeHybridForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    for kind in ("truncated", "corrupt"):
        text = f"the disk tier keeps {kind} state. " + "A long enough prompt. " * 6
        t0 = time.time()
        _tgi(srv, text)  # leaves its prompt's and its end's snapshots on disk
        deadline = time.monotonic() + 60
        while len(new := [f for f in folder.rglob("*.snap") if f.stat().st_mtime >= t0 - 1]) < 2:
            assert time.monotonic() < deadline, "the snapshots never reached the disk"
            time.sleep(0.2)
        before = srv.metric(f"granite_prefix_cache_disk_discarded_{kind}_total", 0.0)
        for f in new:  # files appear whole (renamed): damage each the same way
            data = f.read_bytes()
            f.write_bytes(data[: len(data) // 2] if kind == "truncated" else
                          data[:-40] + bytes([data[-40] ^ 1]) + data[-39:])
        prompt = text + " And more."
        ids, cached = _tgi(srv, prompt)
        assert cached == 0  # nothing resumed from a damaged file: a full prefill
        pids = tok.encode(prompt)
        with torch.no_grad():
            want = hf.generate(torch.tensor([pids]), do_sample=False, max_new_tokens=5)[0, len(pids):].tolist()
        assert ids == want[:len(ids)] and (len(ids) == 5 or ids[-1] == tok.eos_token_id), (ids, want)
        deadline = time.monotonic() + 10  # /metrics follows the engine's counters every second
        while srv.metric(f"granite_prefix_cache_disk_discarded_{kind}_total", 0.0) < before + 1:
            assert time.monotonic() < deadline, f"no {kind} file counted"
            time.sleep(0.3)


def _pid_of_worker(master: int, index: int) -> int:
    """The pid of the worker listening on `worker-<index>.sock` (serve/affinity.py)."""
    inodes = {line.split()[6] for line in Path("/proc/net/unix").read_text().splitlines()[1:]
              if line.endswith(f"worker-{index}.sock")}
    for pid in _workers(master):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return pid
    raise AssertionError(f"no worker listens on worker-{index}.sock")


def test_a_killed_worker_of_two_keeps_its_sessions(tiny_ckpt, tmp_path):
    env = {"MODEL_DIR": str(tiny_ckpt), "SAGEMAKER_MODEL_SERVER_WORKERS": "2", "MAX_CONCURRENT_SEQS": "4",
           "MAX_TOTAL_TOKENS": "2048", "SESSION_TTL": "300", "SNAPSHOT_DISK_DIR": str(tmp_path / "snapshots")}
    srv = ServerProcess(env, tmp_path / "server.log")

    try:
        srv.wait_ready(240)
        srv.wait_workers(8)
        sid = next(s for s in (_open(srv) for _ in range(32)) if s.startswith("w1-"))
        before = [_turn(srv, sid, k) for k in range(2)]
        os.kill(_pid_of_worker(srv.proc.pid, 1), signal.SIGKILL)
        r = _post(srv, {"messages": [{"role": "user", "content": "are you there?"}]}, sid)
        assert r.status_code == 503, r.text  # worker 0 cannot reach it (or the new one is loading): retry, not 404
        deadline = time.monotonic() + 240
        while True:  # what a client does with a 503: retry (nothing of the session changes meanwhile)
            r = _post(srv, {"messages": [{"role": "user", "content": "turn 2: and then what happened?"}],
                            "max_tokens": 6, "temperature": 0}, sid)
            if r.status_code != 503:
                break
            assert time.monotonic() < deadline, srv.log()
            time.sleep(1)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]  # the conversation and its state, found again by the new worker 1
        assert usage["prompt_tokens"] > before[-1][1] and usage["prompt_tokens_details"]["cached_tokens"] > 0
        assert _post(srv, {"requestType": "CLOSE"}, sid).status_code == 200
    finally:
        srv.stop()
