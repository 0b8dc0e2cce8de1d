"""Batch transform on local files: record splitting, ordering, errors, join, journal, skip/redo."""

from __future__ import annotations

import json
import os

import pytest

from serve.batch import fileio
from serve.batch.journal import Journal
from serve.batch.records import may_sample, seed_for
from serve.batch.runner import BatchJob, BatchRun
from tests.batch_helpers import prompts, read_lines, write
from tests.fakes import fake_infer


def run(tmp_path, inp, out=None, infer=fake_infer, **kw):
    out = out or str(tmp_path / "out")
    job = BatchJob(input=str(inp), output=out, work_dir=os.path.join(out, ".batch"), progress="none",
                   concurrency=kw.pop("concurrency", 8), **kw)
    return BatchRun(job, infer).run()


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", []),
        (b"\n", [b""]),
        (b"a\nb\n", [b"a", b"b"]),
        (b"a\nb", [b"a", b"b"]),
        (b"a\r\nb\r\n", [b"a", b"b"]),
        (b"\xef\xbb\xbfa\r\n\r\nb", [b"a", b"", b"b"]),
        (b"\xef\xbb\xbf", []),
        (b"a\n\n\nb\n\n", [b"a", b"", b"", b"b", b""]),
        (b"x\r", [b"x"]),
    ],
)
def test_split_records_any_chunking(data, expected):
    assert list(fileio.split_records([data])) == expected
    for cut in range(len(data) + 1):  # every split point, incl. inside the BOM and inside "\r\n"
        assert list(fileio.split_records([data[:cut], data[cut:]])) == expected
    assert list(fileio.split_records([data[i:i + 1] for i in range(len(data))])) == expected


def test_folder_in_folder_out_keeps_order_and_names(tmp_path):
    inp = tmp_path / "in"
    write(str(inp / "a.jsonl"), prompts(50, "a"))
    write(str(inp / "sub" / "b.txt"), prompts(7, "b"))
    write(str(inp / "_SUCCESS"), "")
    write(str(inp / ".hidden.jsonl"), prompts(3))
    write(str(inp / "old.jsonl.out"), "junk\n")
    s = run(tmp_path, inp, concurrency=16)
    out = tmp_path / "out"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.out")) == ["a.jsonl.out", "sub/b.txt.out"]
    a = read_lines(str(out / "a.jsonl.out"))
    assert [r[0]["generated_text"].split(":")[0] for r in a] == [f"<a{i}" for i in range(50)]
    assert len(read_lines(str(out / "sub" / "b.txt.out"))) == 7
    assert s["records"] == 57 and s["errors"] == 0 and s["files_done"] == 2 and not s["files_failed"]
    assert json.loads((out / "_SUMMARY.json").read_text())["records"] == 57
    assert not list((out / ".batch").rglob("*.journal"))  # journals dropped once published


def test_bad_lines_empty_lines_bom_crlf(tmp_path):
    lines = [json.dumps({"inputs": "ok0"}), "{not json", "", json.dumps({"inputs": "ok3"}), "[1, 2]",
             json.dumps("bare string"), "   "]
    data = b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n" + b"\xff\xfe\n"
    f = write(str(tmp_path / "in" / "mixed.jsonl"), data)
    s = run(tmp_path, f)
    got = read_lines(str(tmp_path / "out" / "mixed.jsonl.out"))
    assert len(got) == len(lines) + 1
    kinds = ["ok" if isinstance(r, list) else r["status"] for r in got]
    assert kinds == ["ok", 400, 400, "ok", 400, "ok", 400, 400]
    assert got[0][0]["generated_text"].startswith("<ok0:") and got[3][0]["generated_text"].startswith("<ok3:")
    assert "UTF-8" in got[-1]["error"]
    assert s["errors"] == 5


def test_empty_file_gives_empty_output(tmp_path):
    f = write(str(tmp_path / "in" / "empty.jsonl"), b"")
    s = run(tmp_path, f)
    assert (tmp_path / "out" / "empty.jsonl.out").read_bytes() == b""
    assert s["records"] == 0 and s["files_done"] == 1


def test_join_input(tmp_path):
    lines = [json.dumps({"id": 7, "inputs": "x"}), json.dumps("bare"), "{bad"]
    f = write(str(tmp_path / "in.jsonl"), "\n".join(lines) + "\n")
    run(tmp_path, f, join_input=True)
    got = read_lines(str(tmp_path / "out" / "in.jsonl.out"))
    assert got[0]["id"] == 7 and got[0]["inputs"] == "x" and got[0]["SageMakerOutput"][0]["generated_text"]
    assert got[1]["SageMakerInput"] == "bare" and isinstance(got[1]["SageMakerOutput"], list)
    assert got[2]["SageMakerInput"] == "{bad" and got[2]["SageMakerOutput"]["status"] == 400


def test_per_record_seeds_are_distinct_and_stable(tmp_path):
    f = write(str(tmp_path / "in.jsonl"), prompts(1, "same") * 3)
    seen = []

    def infer(rec, defaults):
        seen.append(defaults["seed"])
        return fake_infer(rec, defaults)

    run(tmp_path, f, infer=infer, defaults={"max_new_tokens": 2, "temperature": 0.7}, concurrency=1)
    assert seen == [seed_for(0, "in.jsonl", i) for i in range(3)] and len(set(seen)) == 3
    texts = [r[0]["generated_text"] for r in read_lines(str(tmp_path / "out" / "in.jsonl.out"))]
    assert len(set(texts)) == 3  # same prompt, different per-record seed


@pytest.mark.parametrize("record, defaults, sampled", [
    ({"inputs": "x"}, {}, False),
    ({"inputs": "x"}, {"temperature": 0.5}, True),
    ({"inputs": "x", "parameters": {"do_sample": True}}, {}, True),
    ({"inputs": "x", "parameters": {"do_sample": False}}, {"do_sample": True}, False),
    ({"inputs": "x", "parameters": {"top_k": 5}}, {}, True),
    ("bare", {"do_sample": True}, True),
    ({"messages": [{"role": "user", "content": "x"}]}, {}, True),
    ({"messages": [], "temperature": 0}, {}, False),
    ({"prompt": "x"}, {"temperature": 0}, False),
    ({"inputs": "x", "parameters": {"temperature": "hot"}}, {}, False),
])
def test_only_records_that_may_sample_get_a_seed(record, defaults, sampled):
    assert may_sample(record, defaults) is sampled


def test_rerun_skips_finished_files_and_redoes_changed_ones(tmp_path):
    f = write(str(tmp_path / "in" / "a.jsonl"), prompts(5))
    calls = []

    def infer(rec, defaults):
        calls.append(rec)
        return fake_infer(rec, defaults)

    run(tmp_path, tmp_path / "in", infer=infer)
    first = (tmp_path / "out" / "a.jsonl.out").read_bytes()
    s = run(tmp_path, tmp_path / "in", infer=infer)
    assert len(calls) == 5 and s["records_resumed"] == 5 and s["records_this_run"] == 0
    assert (tmp_path / "out" / "a.jsonl.out").read_bytes() == first
    run(tmp_path, tmp_path / "in", infer=infer, defaults={"max_new_tokens": 9})  # other parameters: redo
    assert len(calls) == 10
    write(f, prompts(6))  # other input bytes: redo
    run(tmp_path, tmp_path / "in", infer=infer, defaults={"max_new_tokens": 9})
    assert len(calls) == 16 and len(read_lines(str(tmp_path / "out" / "a.jsonl.out"))) == 6


def test_infer_that_raises_becomes_an_error_line(tmp_path):
    f = write(str(tmp_path / "in.jsonl"), prompts(3))

    def infer(rec, defaults):
        if "p1" in rec:
            raise RuntimeError("boom")
        return fake_infer(rec, defaults)

    s = run(tmp_path, f, infer=infer)
    got = read_lines(str(tmp_path / "out" / "in.jsonl.out"))
    assert got[1]["status"] == 500 and isinstance(got[0], list) and isinstance(got[2], list)
    assert s["errors"] == 1


def test_one_back_pressure_layer_the_pipeline_does_not_retry(tmp_path):
    # How long a record waits for queue room is decided once, in serve/handler.py (QUEUE_WAIT_S, inside
    # infer): a 429 that infer gives up with is that record's line, not a second round of retries here.
    f = write(str(tmp_path / "in.jsonl"), prompts(4))
    calls = []

    def infer(rec, defaults):
        calls.append(rec)
        if len(calls) == 1:
            return {"error": "queue full", "error_type": "queue_full", "status": 429}
        return fake_infer(rec, defaults)

    s = run(tmp_path, f, infer=infer)
    lines = read_lines(str(tmp_path / "out" / "in.jsonl.out"))
    assert len(calls) == 4 and s["errors"] == 1
    assert sum(isinstance(r, dict) and r.get("status") == 429 for r in lines) == 1


def test_journal_torn_tail_and_foreign_fingerprint(tmp_path):
    p = str(tmp_path / "w" / "x.journal")
    j = Journal(p, "fp1")
    j.append(3, b'{"a":1}', False, 2)
    j.append(0, b'{"b":2}', True, 0)
    j.sync()
    j.close()
    with open(p, "ab") as f:
        f.write(b'5\tk\t1\t{"c":')  # killed mid-write
    j = Journal(p, "fp1")
    assert sorted(j.entries) == [0, 3] and j.read(j.entries[3]) == b'{"a":1}' and j.entries[0].error
    j.append(5, b'{"c":3}', False, 1)
    j.sync()
    j.close()
    j = Journal(p, "fp1")
    assert sorted(j.entries) == [0, 3, 5] and j.read(j.entries[5]) == b'{"c":3}'
    j.close()
    j = Journal(p, "fp2")  # another job: set aside, start over
    assert j.entries == {}
    assert any(n.startswith("x.journal.stale") for n in os.listdir(tmp_path / "w"))
    j.close()


def test_missing_input_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        run(tmp_path, tmp_path / "nope")


# ---- the CLI on the real engine (tiny checkpoint) -------------------------------------------------

@pytest.fixture
def cli_env(monkeypatch, tmp_path):
    import torch

    for k in [k for k in os.environ if k.startswith(("SAGEMAKER_", "HF_", "MODEL_"))]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.setenv("MAX_CONCURRENT_SEQS", "64")
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is fastest and fair to a shared machine
    yield
    torch.set_num_threads(threads)


def cli(capsys, *args) -> tuple[int, dict]:
    from serve.batch import main

    rc = main([*map(str, args), "--progress", "none"])
    out = capsys.readouterr().out.strip().splitlines()
    return rc, json.loads(out[-1]) if out else {}


@pytest.mark.slow
def test_cli_10k_records_tiny_model(cli_env, capsys, tiny_ckpt, tmp_path):
    n = 10_000
    lines = [json.dumps({"inputs": f"#{i}", "parameters": {"return_full_text": True}}) for i in range(n)]
    lines[1234] = "{oops"
    f = write(str(tmp_path / "in" / "big.jsonl"), "\n".join(lines) + "\n")
    rc, s = cli(capsys, "--input", f, "--output", tmp_path / "out", "--model-dir", tiny_ckpt,
                "--max-new-tokens", 1)
    assert rc == 0 and s["records"] == n and s["errors"] == 1 and s["generated_tokens_this_run"] == n - 1
    got = read_lines(str(tmp_path / "out" / "big.jsonl.out"))
    assert len(got) == n and got[1234]["status"] == 400
    for i in (0, 1, 999, 5000, n - 1):  # return_full_text: the prompt (with its index) leads the output
        assert got[i]["generated_text"].startswith(f"#{i}") and got[i]["details"]["generated_tokens"] == 1


def test_cli_sampled_output_does_not_depend_on_concurrency(cli_env, capsys, tiny_ckpt, tmp_path):
    f = write(str(tmp_path / "in.jsonl"), (json.dumps({"inputs": "sample me"}) + "\n") * 24 + json.dumps({"messages": [
        {"role": "user", "content": "hi"}]}) + "\n")
    outs = []
    for conc in (1, 16):
        out = tmp_path / f"out{conc}"
        rc, s = cli(capsys, "--input", f, "--output", out, "--model-dir", tiny_ckpt, "--max-new-tokens", 6,
                    "--temperature", 1.0, "--parameters", '{"do_sample": true}', "--concurrency", conc)
        assert rc == 0 and s["errors"] == 0, s
        outs.append([json.loads(x) for x in (out / "in.jsonl.out").read_bytes().splitlines()])
    assert outs[0][24]["created"] == int(os.stat(f).st_mtime) and outs[0][24]["id"].startswith("chatcmpl-")
    assert outs[0] == outs[1]
    texts = [r["generated_text"] for r in outs[0][:24]]
    assert len(set(texts)) > 1  # the same prompt 24 times, sampled with per-record seeds


def test_cli_bad_arguments_and_missing_model(cli_env, capsys, tiny_ckpt, tmp_path):
    f = write(str(tmp_path / "in.jsonl"), prompts(1))
    assert cli(capsys, "--input", f, "--output", tmp_path / "o", "--model-dir", tiny_ckpt,
               "--parameters", "[1]")[0] == 2
    assert cli(capsys, "--input", f, "--output", tmp_path / "o", "--model-dir", tiny_ckpt,
               "--temperature", -1)[0] == 2
    assert cli(capsys, "--input", f, "--output", tmp_path / "o", "--model-dir", tiny_ckpt,
               "--parameters", '{"return_full_text": true}')[0] == 2  # per record only
    assert cli(capsys, "--input", f, "--output", tmp_path / "o", "--model-dir", tmp_path / "empty")[0] == 2
    assert cli(capsys, "--input", tmp_path / "missing", "--output", tmp_path / "o", "--model-dir", tiny_ckpt)[0] == 2


def test_progress_log_lines_and_bar(caplog, monkeypatch, capsys):
    from serve.batch import progress as batch_progress

    monkeypatch.setattr(batch_progress, "LOG_EVERY_S", 0.0)
    p = batch_progress.Progress("log")
    p.add_total(10)
    p.total_final = True
    p.add_done(3, resumed=True)
    p.add_done(2, errors=1, tokens=40)
    with caplog.at_level("INFO", logger="serve.batch"):
        p.tick()
    line = caplog.records[-1].getMessage()
    assert "5/10 records (50.0%)" in line and "1 errors" in line and "tok/s" in line and "ETA" in line
    bar = batch_progress.Progress("bar")  # tqdm on stderr (a TTY in real use)
    bar.add_total(4)
    bar.add_done(4, tokens=8)
    bar.close()
    assert "4/4" in capsys.readouterr().err


def test_output_folder_may_be_the_input_folder(tmp_path):
    d = tmp_path / "data"
    write(str(d / "a.jsonl"), prompts(3))
    for _ in range(2):  # the second run must not read a.jsonl.out, _SUMMARY.json or .batch/ as inputs
        s = run(tmp_path, d, out=str(d))
        assert s["files"] == 1 and s["records"] == 3
    assert sorted(p.name for p in d.iterdir()) == [".batch", "_SUMMARY.json", "a.jsonl", "a.jsonl.out"]
