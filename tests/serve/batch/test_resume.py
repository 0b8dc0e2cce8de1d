"""Kill the batch at random moments (SIGKILL, after some records are journalled), run it again with the
same arguments, and require the final files to be byte-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.batch_helpers import prompts, write

ROOT = Path(__file__).resolve().parents[3]

# The pipeline with the stand-in infer (slowed down so that a kill lands mid-run).
PIPELINE = """
import functools, sys
from serve.batch.runner import BatchJob, BatchRun
import pytest

from tests.fakes import fake_infer
inp, out = sys.argv[1], sys.argv[2]
job = BatchJob(input=inp, output=out, work_dir=out + "/.batch", progress="none", concurrency=8,
               defaults={"max_new_tokens": 2}, join_input=True)
s = BatchRun(job, functools.partial(fake_infer, delay_s=0.002)).run()
sys.exit(1 if s["files_failed"] else 0)
"""


def journalled(out: Path) -> int:
    n = 0
    for j in (out / ".batch").rglob("*.journal"):
        n += max(0, j.read_bytes().count(b"\n") - 1)
    return n


def kill_after(cmd: list[str], out: Path, min_records: int, env: dict | None = None, timeout: float = 300.0,
               sig: int = signal.SIGKILL) -> bool:
    """Start cmd, send `sig` once `min_records` are journalled. False if it finished first."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while p.poll() is None and time.monotonic() < deadline:
            if journalled(out) >= min_records:
                p.send_signal(sig)
                rc = p.wait(60)
                assert sig == signal.SIGKILL or rc == 130  # SIGTERM: stops cleanly, says "interrupted"
                return True
            time.sleep(0.002)
        return False
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def outputs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.out"))}


def test_sigkill_at_random_points_then_resume_is_byte_identical(tmp_path):
    inp = tmp_path / "in"
    write(str(inp / "a.jsonl"), prompts(400, "a"))
    write(str(inp / "b.jsonl"), "not json\n" + prompts(300, "b") + '"bare"\n')
    write(str(inp / "c.jsonl"), b"")
    ref = tmp_path / "ref"
    py = [sys.executable, "-c", PIPELINE]
    assert subprocess.run([*py, str(inp), str(ref)], cwd=ROOT).returncode == 0
    expected = outputs(ref)
    assert len(expected) == 3 and expected["a.jsonl.out"].count(b"\n") == 400

    out = tmp_path / "out"
    rng = random.Random(1234)
    kills, done = 0, 0
    for _ in range(4):
        done = journalled(out) if out.exists() else 0
        if kill_after([*py, str(inp), str(out)], out, done + rng.randint(10, 120)):
            kills += 1
    assert kills >= 2  # the kills really happened mid-run
    assert subprocess.run([*py, str(inp), str(out)], cwd=ROOT).returncode == 0
    assert outputs(out) == expected
    assert not list(out.rglob("*.tmp*"))  # no staged leftovers from this pid... or published partials


@pytest.mark.slow
def test_cli_on_the_tiny_model_killed_and_resumed_is_byte_identical(tiny_ckpt, tmp_path):
    """The real thing: `python -m serve batch` with the engine, greedy + sampled + chat records."""
    recs = []
    for i in range(500):
        if i % 50 == 17:
            recs.append("{torn")
        elif i % 7 == 3:
            recs.append(json.dumps({"messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 3}))
        elif i % 5 == 1:
            recs.append(json.dumps({"inputs": f"sample {i}", "parameters": {"do_sample": True, "top_k": 20}}))
        else:
            recs.append(json.dumps({"inputs": f"greedy {i}"}))
    inp = tmp_path / "in"
    write(str(inp / "x.jsonl"), "\n".join(recs[:350]) + "\n")
    write(str(inp / "y.jsonl"), "\r\n".join(recs[350:]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "HF_", "MODEL_"))}
    env.update(DEVICE="cpu", OMP_NUM_THREADS="1", MAX_NEW_TOKENS="3", MAX_CONCURRENT_SEQS="16")

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "serve", "batch", "--input", str(inp), "--output", str(out),
                "--model-dir", str(tiny_ckpt), "--progress", "log", "--concurrency", "24"]

    ref = tmp_path / "ref"
    assert subprocess.run(cmd(ref), cwd=ROOT, env=env, capture_output=True, timeout=600).returncode == 0
    expected = outputs(ref)
    assert sorted(expected) == ["x.jsonl.out", "y.jsonl.out"]

    out = tmp_path / "out"
    rng = random.Random(99)
    kills = 0
    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
        done = journalled(out) if out.exists() else 0
        if kill_after(cmd(out), out, done + rng.randint(20, 120), env, sig=sig):
            kills += 1
    assert kills >= 2
    r = subprocess.run(cmd(out), cwd=ROOT, env=env, capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    summary = json.loads(r.stdout.decode().strip().splitlines()[-1])
    assert summary["records"] == 500 and summary["records_resumed"] > 0
    assert outputs(out) == expected

