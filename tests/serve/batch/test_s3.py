"""Batch transform against S3: moto in server mode on 127.0.0.1, reached through boto3's own
AWS_ENDPOINT_URL (the code under test has no test-only switch)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from serve.batch import s3io
from serve.batch.runner import BatchJob, BatchRun
from tests.batch_helpers import prompts, read_lines, write
from tests.fakes import fake_infer

ROOT = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_url():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(moto_url, monkeypatch):
    for k, v in {"AWS_ENDPOINT_URL": moto_url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_SESSION_TOKEN": "testing"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3io.reset_client()
    c = boto3.client("s3")
    bucket = f"b{os.urandom(4).hex()}"
    c.create_bucket(Bucket=bucket)
    yield c, bucket
    s3io.reset_client()


def put(c, bucket, key, data):
    c.put_object(Bucket=bucket, Key=key, Body=data.encode() if isinstance(data, str) else data)


def get(c, bucket, key) -> bytes:
    return c.get_object(Bucket=bucket, Key=key)["Body"].read()


def run(inp, out, work_dir, **kw):
    job = BatchJob(input=inp, output=out, work_dir=str(work_dir), progress="none", concurrency=8, **kw)
    return BatchRun(job, fake_infer).run()


def test_s3_prefix_in_s3_prefix_out(s3, tmp_path):
    c, b = s3
    put(c, b, "in/a.jsonl", prompts(40, "a"))
    put(c, b, "in/deep/b.jsonl", b"\xef\xbb\xbf" + prompts(3, "b").replace("\n", "\r\n").encode())
    put(c, b, "in/empty.jsonl", b"")
    put(c, b, "in/_SUCCESS", b"")
    put(c, b, "inx/not-mine.jsonl", prompts(2))  # shares the string prefix, not the folder
    s = run(f"s3://{b}/in", f"s3://{b}/out/", tmp_path / "w")
    keys = sorted(o["Key"] for o in c.list_objects_v2(Bucket=b, Prefix="out/")["Contents"])
    assert keys == ["out/_SUMMARY.json", "out/a.jsonl.out", "out/deep/b.jsonl.out", "out/empty.jsonl.out"]
    a = [json.loads(x) for x in get(c, b, "out/a.jsonl.out").decode().splitlines()]
    assert [r[0]["generated_text"].split(":")[0] for r in a] == [f"<a{i}" for i in range(40)]
    assert get(c, b, "out/deep/b.jsonl.out").count(b"\n") == 3 and get(c, b, "out/empty.jsonl.out") == b""
    assert s["records"] == 43 and s["files_done"] == 3
    assert json.loads(get(c, b, "out/_SUMMARY.json"))["records"] == 43
    assert get(c, b, "out/a.jsonl.out") == _local_reference(tmp_path, prompts(40, "a"), "a.jsonl")


def _local_reference(tmp_path, data, name) -> bytes:
    f = write(str(tmp_path / "ref_in" / name), data)
    run(f, str(tmp_path / "ref_out"), tmp_path / "ref_out" / ".batch")
    return (tmp_path / "ref_out" / f"{name}.out").read_bytes()


def test_single_s3_object_to_local_and_local_to_s3(s3, tmp_path):
    c, b = s3
    put(c, b, "data/one.jsonl", prompts(5))
    run(f"s3://{b}/data/one.jsonl", str(tmp_path / "out"), tmp_path / "out" / ".batch")
    assert len(read_lines(str(tmp_path / "out" / "one.jsonl.out"))) == 5
    f = write(str(tmp_path / "local" / "two.jsonl"), prompts(4))
    run(f, f"s3://{b}/res", tmp_path / "w2")
    got = [json.loads(x) for x in get(c, b, "res/two.jsonl.out").decode().splitlines()]
    assert [r[0]["generated_text"].split(":")[0] for r in got] == [f"<p{i}" for i in range(4)]


def test_s3_resume_from_journal_runs_only_missing_records(s3, tmp_path):
    c, b = s3
    put(c, b, "in/a.jsonl", prompts(30))
    run(f"s3://{b}/in", f"s3://{b}/full", tmp_path / "w_full")
    full = get(c, b, "full/a.jsonl.out")
    # a first run that dies after 12 records: leave its journal behind by failing the upload
    calls = []

    def infer(rec, d):
        calls.append(rec)
        return fake_infer(rec, d)

    job = BatchJob(input=f"s3://{b}/in", output=f"s3://{b}/part", work_dir=str(tmp_path / "w"), progress="none",
                   concurrency=4)
    br = BatchRun(job, infer)
    real = s3io.upload_file
    s3io.upload_file = lambda *a, **k: (_ for _ in ()).throw(OSError("upload refused"))
    try:
        s = br.run()
    finally:
        s3io.upload_file = real
    assert s["files_failed"] and len(calls) == 30
    # drop 18 of the journalled records as if the process had died earlier
    j = tmp_path / "w" / "a.jsonl.journal"
    lines = j.read_bytes().split(b"\n")
    j.write_bytes(b"\n".join(lines[:13]) + b"\n" + lines[13][:5])  # header + 12 records + a torn line
    calls.clear()
    s = BatchRun(job, infer).run()
    assert len(calls) == 18 and s["records_resumed"] == 12 and not s["files_failed"]
    assert get(c, b, "part/a.jsonl.out") == full


def test_multipart_upload_and_broken_read_stream(s3, tmp_path, monkeypatch):
    c, b = s3
    monkeypatch.setattr(s3io, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * 1024 * 1024 + 17))
    s3io.upload_file(str(big), b, "big.bin")
    assert get(c, b, "big.bin") == big.read_bytes()
    obj = s3io.head(b, "big.bin")
    assert obj.size == big.stat().st_size
    # a stream that breaks mid-way is reopened at the right byte
    real_get = s3io.client().get_object
    broken = {"n": 0}

    class Breaking:
        def __init__(self, body):
            self.body = body

        def iter_chunks(self, size):
            for i, chunk in enumerate(self.body.iter_chunks(size)):
                if i == 2 and broken["n"] < 2:
                    broken["n"] += 1
                    raise ConnectionError("reset by peer")
                yield chunk

    def get_object(**kw):
        r = real_get(**kw)
        return {**r, "Body": Breaking(r["Body"])}

    monkeypatch.setattr(s3io.client(), "get_object", get_object)
    assert b"".join(s3io.iter_bytes(obj)) == big.read_bytes() and broken["n"] == 2


def test_cli_s3_in_s3_out_with_the_tiny_model(s3, moto_url, tiny_ckpt, tmp_path):
    """`python -m serve batch` in a subprocess, S3 both ways; boto3 finds moto through AWS_ENDPOINT_URL."""
    c, b = s3
    recs = [json.dumps({"inputs": f"line {i}", "parameters": {"return_full_text": True}}) for i in range(30)]
    recs[4] = "{nope"
    put(c, b, "jobs/in/p1.jsonl", "\n".join(recs[:20]) + "\n")
    put(c, b, "jobs/in/p2.jsonl", "\n".join(recs[20:]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "HF_", "MODEL_", "AWS_"))}
    env.update(AWS_ENDPOINT_URL=moto_url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION="us-east-1", DEVICE="cpu", OMP_NUM_THREADS="1", MAX_NEW_TOKENS="2",
               MODEL_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "serve", "batch", "--input", f"s3://{b}/jobs/in/",
                        "--output", f"s3://{b}/jobs/out", "--model-dir", str(tiny_ckpt), "--join-input",
                        "--progress", "log"], cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    summary = json.loads(r.stdout.decode().strip().splitlines()[-1])
    assert summary["records"] == 30 and summary["errors"] == 1 and summary["files_done"] == 2
    got = [json.loads(x) for x in (get(c, b, "jobs/out/p1.jsonl.out") + get(c, b, "jobs/out/p2.jsonl.out")).splitlines()]
    assert len(got) == 30
    for i, o in enumerate(got):
        if i == 4:
            assert o["SageMakerInput"] == "{nope" and o["SageMakerOutput"]["status"] == 400
        else:  # join-input keeps the record's own fields; return_full_text puts the prompt first
            assert o["inputs"] == f"line {i}" and o["SageMakerOutput"]["generated_text"].startswith(f"line {i}")
    assert json.loads(get(c, b, "jobs/out/_SUMMARY.json"))["records"] == 30
    # the journals lived in a local work dir under MODEL_CACHE_DIR, and are gone once published
    assert (tmp_path / "cache" / "batch").is_dir() and not list((tmp_path / "cache").rglob("*.journal"))
