"""The disk tier on the real runner (tiny checkpoint, fp32, CPU), against Hugging Face greedy on the full prompt: a
resume from a snapshot file, a fall back to a full prefill when the file is truncated, bit-flipped or another
model's, and a session that a new engine on the same folder (a restarted worker) resumes from its saved state."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import blake3
import pytest

from model.types import GenerationRequest, SamplingParams
from tests.fakes import ENGINES, check_pools_and_shut_down, real_engine

from .test_prefix_resume import gen, hf_greedy, ids


@pytest.fixture(autouse=True)
def nothing_leaks():
    ENGINES.clear()
    yield
    check_pools_and_shut_down(ENGINES)


def disk_engine(ckpt, folder: Path, **cfg):
    """Nothing in device or host memory: every snapshot goes to disk."""
    return real_engine(ckpt, snapshot_device_share=0.0, snapshot_host_bytes=0, snapshot_disk_dir=str(folder),
                       snapshot_disk_bytes=64 << 20, **cfg)


def flushed(eng):
    assert eng.prefix.store.flush(30)
    return eng.stats()["prefix_cache"]


def test_resume_from_disk_equals_a_full_prefill(tiny_ckpt, hf_model, tmp_path):
    eng = disk_engine(tiny_ckpt, tmp_path)
    p = ids(37, seed=11)
    out = list(gen(eng, p, 5).token_ids)
    st = flushed(eng)
    assert st["snapshots_disk"] == 2 and st["bytes_disk"] == sum(f.stat().st_size for f in tmp_path.glob("*.snap"))
    q = p + out + ids(20, seed=12)
    before = eng.stats()["prefill_tokens_total"]
    c = gen(eng, q, 6)
    assert c.cached_tokens == len(p) + len(out) - 1
    assert eng.stats()["prefill_tokens_total"] - before == len(q) - c.cached_tokens
    assert list(c.token_ids) == hf_greedy(hf_model, q, 6)
    st = eng.stats()["prefix_cache"]
    assert st["hits_disk"] == 1 and st["disk_reads"] == 1 and st["disk_discarded"] == 0


def _flip(path: Path):
    b = bytearray(path.read_bytes())
    b[-100] ^= 0x01  # one bit of the payload's KV
    path.write_bytes(bytes(b))


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _foreign(path: Path):
    """The same snapshot as another model would write it: a valid file (checksum and all) of another identity."""
    data = path.read_bytes()
    pre = struct.Struct("<8sIQ")
    magic, hlen, plen = pre.unpack_from(data)
    header = json.loads(data[pre.size:pre.size + hlen])
    header["identity"] = "another-model"
    new_header = json.dumps(header, separators=(",", ":")).encode()
    body = pre.pack(magic, len(new_header), plen) + new_header + data[pre.size + hlen:pre.size + hlen + plen]
    path.write_bytes(body + blake3.blake3(body).digest())


@pytest.mark.parametrize("damage", [_truncate, _flip, _foreign], ids=["truncated", "bit-flipped", "foreign"])
def test_a_damaged_file_falls_back_to_a_full_prefill(tiny_ckpt, hf_model, tmp_path, damage):
    eng = disk_engine(tiny_ckpt, tmp_path)
    p = ids(29, seed=21)
    gen(eng, p, 4)
    flushed(eng)
    for f in tmp_path.glob("*.snap"):
        damage(f)
    q = p + ids(15, seed=22)
    c = gen(eng, q, 6)
    assert c.cached_tokens == 0  # nothing resumed from a damaged file
    assert list(c.token_ids) == hf_greedy(hf_model, q, 6)
    why = {"_truncate": "truncated", "_flip": "corrupt", "_foreign": "foreign"}[damage.__name__]
    st = eng.stats()["prefix_cache"]
    assert st[f"disk_discarded_{why}"] >= 1 and st["hits_disk"] == 0


def test_a_session_resumes_in_a_restarted_engine(tiny_ckpt, hf_model, tmp_path):
    cfg = dict(snapshot_disk_dir=str(tmp_path), snapshot_disk_bytes=64 << 20)
    eng = real_engine(tiny_ckpt, **cfg)  # device and host tiers as usual: the session is written through
    p = ids(33, seed=31)
    first = gen(eng, p, 5, session="w0-abc")
    conv = eng.session_conversation("w0-abc")  # returns once the state is on disk
    assert conv == tuple(p) + first.token_ids
    eng.shutdown()  # the worker dies: nothing of its memory survives
    ENGINES.remove(eng)
    eng2 = real_engine(tiny_ckpt, **cfg)
    assert eng2.session_conversation("w0-abc") == conv
    assert eng2.stats()["prefix_cache"]["sessions"] == 1
    q = list(conv) + ids(12, seed=32)
    c = eng2.submit(GenerationRequest(tuple(q), SamplingParams(max_new_tokens=6, ignore_eos=True),
                                      session_id="w0-abc")).result()
    assert c.cached_tokens == len(conv) - 1  # the saved state: everything but the last output token
    assert list(c.token_ids) == hf_greedy(hf_model, q, 6)
    assert eng2.release_session("w0-abc")
    assert not (tmp_path / "pins" / "w0-abc.json").exists()
