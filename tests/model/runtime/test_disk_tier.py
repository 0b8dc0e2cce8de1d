"""The disk tier's file format and writer (model/runtime/disk_tier.py), with plain bytes as payloads."""

from __future__ import annotations

import threading

from model.runtime.disk_tier import DiskTier


def _bytes(packed):
    return memoryview(packed)


def test_write_read_roundtrip_and_checks(tmp_path):
    t = DiskTier(tmp_path, "id-a", 1 << 20, _bytes)
    payload = bytes(range(256)) * 40
    key = t.write("ns", [1, 2, 3], payload, len(payload))
    assert t.flush(10)
    path = tmp_path / f"{key}.snap"
    assert path.stat().st_size == t.file_size("ns", [1, 2, 3], len(payload))
    assert bytes(t.read(key, "ns", [1, 2, 3])) == payload
    assert t.read(key, "other-ns", [1, 2, 3]) is None  # asked for another namespace: foreign, discarded
    assert t.stats()["disk_discarded_foreign"] == 1 and not path.exists()
    assert t.read(key, "ns", [1, 2, 3]) is None  # gone: a miss, not counted again
    assert t.stats()["disk_discarded"] == 1
    t.close()


def test_a_queued_write_is_read_from_memory_and_a_delete_cancels_it(tmp_path):
    gate = threading.Event()

    def slow(packed):
        if packed == b"x" * 100:
            gate.wait(10)
        return memoryview(packed)

    t = DiskTier(tmp_path, "id", 1 << 20, slow)
    first = t.write("", [9], b"x" * 100, 100)  # the writer waits in slow() on this one
    key = t.write("", [1], b"a" * 100, 100)
    assert bytes(t.read(key, "", [1])) == b"a" * 100  # still queued: from memory
    assert t.stats()["disk_reads"] == 0 and t.stats()["disk_pending_bytes"] > 0
    t.delete(key)
    gate.set()
    assert t.flush(10)
    assert not (tmp_path / f"{key}.snap").exists() and (tmp_path / f"{first}.snap").exists()
    t.close()


def test_a_full_queue_refuses_the_write(tmp_path):
    gate = threading.Event()
    t = DiskTier(tmp_path, "id", 1 << 20, lambda p: (gate.wait(10), memoryview(p))[1], max_pending_bytes=300)
    assert t.write("", [1], b"a" * 200, 200) is not None
    assert t.write("", [2], b"b" * 200, 200) is None  # 2 x ~250 bytes > 300 queued
    assert t.stats()["disk_writes_refused"] == 1
    gate.set()
    assert t.flush(10)
    t.close()


def test_scan_keeps_valid_files_and_deletes_the_rest(tmp_path):
    t = DiskTier(tmp_path, "id-a", 1 << 20, _bytes)
    good = t.write("", [1, 2], b"g" * 64, 64)
    bad = t.write("", [3, 4], b"b" * 64, 64)
    t.write_pin("w0-abc", good, [1, 2, 5])
    t.flush(10)
    (tmp_path / f".{good}.snap.123.tmp").write_bytes(b"half")  # a write cut by a kill
    p = tmp_path / f"{bad}.snap"
    p.write_bytes(p.read_bytes()[:-1])
    entries, pins = DiskTier(tmp_path, "id-a", 1 << 20, _bytes).scan()
    assert [(e.key, e.ids) for e in entries] == [(good, (1, 2))] and pins == {"w0-abc": (good, (1, 2, 5))}
    assert sorted(f.name for f in tmp_path.iterdir() if f.is_file()) == [f"{good}.snap"]
    other = DiskTier(tmp_path, "id-b", 1 << 20, _bytes)  # another model: nothing is its own
    assert other.scan() == ([], {}) and other.stats()["disk_discarded_foreign"] == 1
    assert not list(tmp_path.glob("*.snap")) and not list((tmp_path / "pins").iterdir())
