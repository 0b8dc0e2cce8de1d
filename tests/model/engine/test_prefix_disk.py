"""The prefix cache's disk tier (torch-free policy + the real file format, model/runtime/disk_tier.py): host overflow
spills to files under a byte budget that is never exceeded, a resume reads the file back by value, a truncated,
bit-flipped or foreign file is discarded (counted) and the prompt falls back, session pins outlive the cache (a
restarted worker finds them) and are never evicted, and a released session's files are deleted."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from model.engine.prefix_cache import DISK, HOST, PrefixCache
from model.runtime.blocks import SlotAllocator
from model.runtime.disk_tier import DiskTier
from tests.fakes import BS, ListCopier

from .test_prefix_cache import run


def make(tmp_path: Path, disk=100_000, host=0, device=0, identity="model-a", slots=4, blocks=64):
    alloc = SlotAllocator(slots, blocks, BS)
    cop = ListCopier(slots, blocks)
    store = DiskTier(tmp_path, identity, disk, cop.to_bytes)
    cache = PrefixCache(alloc, cop, device, host, store)
    cache.load_disk()
    return alloc, cop, cache


def files(tmp_path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in tmp_path.glob("*.snap")}


def prompt(seed, n):
    rng = random.Random(seed)
    return [rng.randrange(1, 200) for _ in range(n)]


def test_host_overflow_spills_to_disk_and_resumes_by_value(tmp_path):
    alloc, cop, cache = make(tmp_path, host=300)  # room for ~one host snapshot
    convs = [prompt(i, 9) for i in range(4)]
    for p in convs:
        assert run(alloc, cop, cache, p, new=[1, 2]) == 0
    st = cache.stats()
    assert st["spills"] > 0 and st["snapshots_disk"] > 0 and st["bytes_host"] <= 300
    cache.store.flush()
    assert sum(files(tmp_path).values()) == st["bytes_disk"] > 0  # accounted = on disk, exactly
    for p in convs:  # every conversation resumes (from host or disk): run() checks the restored state and KV
        assert run(alloc, cop, cache, p + [1, 5, 6], new=[3]) == len(p) + 1
    st = cache.stats()
    assert st["hits_disk"] >= 1 and st["disk_reads"] >= 1 and st["disk_discarded"] == 0


def test_disk_budget_is_never_exceeded(tmp_path):
    rng = random.Random(3)
    budget = 4_000
    alloc, cop, cache = make(tmp_path, disk=budget, host=400)
    convs = [[] for _ in range(6)]
    for i in range(120):
        c = rng.randrange(6)
        p = (convs[c] or []) + [rng.randrange(1, 50) for _ in range(rng.randint(1, 6))]
        new = [rng.randrange(1, 50) for _ in range(rng.randint(1, 3))]
        if len(p) + len(new) > 60:
            convs[c] = []
            continue
        run(alloc, cop, cache, p, new)
        convs[c] = p + new
        assert cache.stats()["bytes_disk"] <= budget
        if i % 10 == 0:
            cache.store.flush()
            on_disk = sum(files(tmp_path).values())
            assert on_disk <= budget and on_disk == cache.stats()["bytes_disk"]
    st = cache.stats()
    assert st["spills"] > 20 and st["evictions"] > 0 and st["hits_disk"] > 0
    cache.clear()
    cache.store.flush()
    assert files(tmp_path) == {} and cache.stats()["bytes_disk"] == 0 and alloc.num_free_blocks == 64


def _spilled(tmp_path):
    """One snapshot of a 9-token prompt (and its 10-token end) on disk, nothing in memory."""
    alloc, cop, cache = make(tmp_path)
    p = prompt(7, 9)
    run(alloc, cop, cache, p, new=[1, 2])
    assert {s.tier for s in cache.lru.values()} == {DISK}
    cache.store.flush()
    return alloc, cop, cache, p


def _flip(path: Path):
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0x10
    path.write_bytes(bytes(b))


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[:-7])


@pytest.mark.parametrize("damage", [_flip, _truncate])
def test_a_damaged_file_is_discarded_counted_and_the_prompt_falls_back(tmp_path, damage):
    alloc, cop, cache, p = _spilled(tmp_path)
    path = tmp_path / f"{cache.trie.longest(p + [1, 2, 9], 11).disk}.snap"  # the end of the first turn
    damage(path)
    assert run(alloc, cop, cache, p + [1, 2, 9]) == len(p)  # the damaged one discarded: the prompt's own snapshot
    why = "corrupt" if damage is _flip else "truncated"
    st = cache.stats()
    assert st[f"disk_discarded_{why}"] == 1 and st["disk_discarded"] == 1 and not path.exists()
    cache.store.flush()
    for f in tmp_path.glob("*.snap"):  # every file damaged: a full prefill, with the right values (run checks)
        damage(f)
    assert run(alloc, cop, cache, p + [1, 2, 9, 4, 4]) == 0
    assert cache.stats()[f"disk_discarded_{why}"] >= 3
    cache.store.flush()
    assert sum(files(tmp_path).values()) == cache.stats()["bytes_disk"]  # discarded files left the accounting


def test_a_foreign_file_is_never_loaded(tmp_path):
    alloc, cop, cache, p = _spilled(tmp_path)
    n_files = len(files(tmp_path))
    # another model's worker on the same folder: every file is foreign, discarded at its scan, counted
    _, cop_b, other = make(tmp_path, identity="model-b")
    assert other.stats()["disk_discarded_foreign"] == n_files and files(tmp_path) == {}
    assert len(other.lru) == 0
    # a file swapped under a live cache: found at read, discarded, the prompt prefilled in full
    alloc, cop, cache, p = _spilled(tmp_path / "again")
    evil = DiskTier(tmp_path / "again", "model-b", 10**6, cop.to_bytes)
    for s in list(cache.lru.values()):
        evil.write(s.namespace, s.ids, ((999,) * len(s.ids), (999,) * len(s.ids)), cop.host_bytes(len(s.ids)))
    evil.flush()
    assert run(alloc, cop, cache, p + [1, 2, 9]) == 0  # run() asserts no 999 was restored
    assert cache.stats()["disk_discarded_foreign"] == 2


def test_sessions_survive_a_restart_pinned_and_closed_ones_are_deleted(tmp_path):
    alloc, cop, cache = make(tmp_path, disk=2_000, host=10_000, device=10_000)
    a, b = prompt(1, 9), prompt(2, 9)
    run(alloc, cop, cache, a, new=[5, 6], session="s-a")
    run(alloc, cop, cache, b, new=[7, 8], session="s-b")
    assert cache.store.wait_pin("s-a", 10) and cache.store.wait_pin("s-b", 10)
    # fill the disk with other snapshots: the pinned files stay
    for i in range(30):
        run(alloc, cop, cache, prompt(100 + i, 12), new=[1])
        cache.device_budget = cache.host_budget = 0
        cache._fit()
    assert cache.stats()["bytes_disk"] <= 2_000
    pinned = {cache._sessions[s][0].disk for s in ("s-a", "s-b")}
    cache.store.flush()
    assert all((tmp_path / f"{k}.snap").exists() for k in pinned)
    # the restart: a new cache on the same folder (the old one is gone with its memory)
    alloc2, cop2, cache2 = make(tmp_path, disk=2_000, host=10_000, device=10_000)
    assert cache2.conversation("s-a") == (*a, 5, 6) and cache2.conversation("s-b") == (*b, 7, 8)
    assert run(alloc2, cop2, cache2, [*a, 5, 6, 9], new=[1]) == len(a) + 1  # resumed from its own state
    assert cache2.release_session("s-b")
    cache2.store.flush()
    assert not (tmp_path / "pins" / "s-b.json").exists() and not any(
        s.ids == (*b, 7) for s in cache2.lru.values())
    _, _, cache3 = make(tmp_path, disk=2_000)
    assert cache3.conversation("s-b") is None and cache3.conversation("s-a") == (*a, 5, 6)


def test_no_disk_tier_means_host_overflow_is_dropped(tmp_path):
    alloc = SlotAllocator(4, 64, BS)
    cop = ListCopier(4, 64)
    cache = PrefixCache(alloc, cop, 0, 300)
    for i in range(4):
        run(alloc, cop, cache, prompt(i, 9), new=[1, 2])
    st = cache.stats()
    assert st["spills"] == 0 and st["snapshots_disk"] == 0 and st["evictions"] > 0
    assert {s.tier for s in cache.lru.values()} == {HOST}


def test_pinned_sessions_with_a_file_leave_memory_within_the_host_budget(tmp_path):
    alloc, cop, cache = make(tmp_path, disk=100_000, host=300, device=0)
    convs = {f"s{i}": prompt(50 + i, 9) for i in range(5)}
    for sid, p in convs.items():
        run(alloc, cop, cache, p, new=[3, 4], session=sid)
    st = cache.stats()
    assert st["bytes_host"] <= 300 and st["sessions"] == 5 and st["sessions_not_persisted"] == 0
    assert sum(s.tier == DISK for s, _ in cache._sessions.values()) >= 4  # pinned, on disk, not in memory
    for sid, p in convs.items():  # each session resumes from its own state (run checks the values)
        assert run(alloc, cop, cache, [*p, 3, 4, 9], new=[1], session=sid) == len(p) + 1
    for sid in convs:
        assert cache.release_session(sid)
    cache.clear()
    cache.store.flush()
    assert files(tmp_path) == {} and not list((tmp_path / "pins").iterdir())


def test_a_pin_that_does_not_fit_is_not_persisted_and_counted(tmp_path):
    alloc, cop, cache = make(tmp_path, disk=500, host=10_000, device=10_000)  # one pinned file (~340 bytes)
    run(alloc, cop, cache, prompt(1, 9), new=[3, 4], session="a")
    run(alloc, cop, cache, prompt(2, 9), new=[3, 4], session="b")
    st = cache.stats()
    assert st["sessions_not_persisted"] == 1 and st["bytes_disk"] <= 500
    cache.store.flush()
    assert sorted(p.name for p in (tmp_path / "pins").iterdir()) == ["a.json"]
    assert sum(files(tmp_path).values()) <= 500
    for sid in ("a", "b"):
        cache.release_session(sid)


def test_a_restart_with_a_lower_budget_keeps_the_pinned_files_first(tmp_path):
    alloc, cop, cache = make(tmp_path, disk=100_000)
    run(alloc, cop, cache, prompt(1, 9), new=[3, 4], session="a")
    for i in range(8):
        run(alloc, cop, cache, prompt(10 + i, 12), new=[1, 2])
    cache.store.flush()
    pinned = cache._sessions["a"][0].disk
    _, _, small = make(tmp_path, disk=1_000)  # restarted with a lower budget
    assert small.stats()["bytes_disk"] <= 1_000 and sum(files(tmp_path).values()) <= 1_000
    assert small._sessions["a"][0].disk == pinned and (tmp_path / f"{pinned}.snap").exists()
    assert len(small.lru) > 1  # the newest unpinned ones fill the rest


def test_any_session_id_makes_a_safe_pin_file(tmp_path):
    alloc, cop, cache = make(tmp_path / "tier", host=10_000, device=10_000)
    odd = "../../escape/ me"
    run(alloc, cop, cache, prompt(3, 9), new=[3, 4], session=odd)
    cache.store.flush()
    assert not (tmp_path / "escape").exists() and len(list((tmp_path / "tier" / "pins").iterdir())) == 1
    _, _, again = make(tmp_path / "tier")
    assert again.conversation(odd) == (*prompt(3, 9), 3, 4)
    assert again.release_session(odd) and not list((tmp_path / "tier" / "pins").iterdir())
