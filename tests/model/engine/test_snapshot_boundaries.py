"""Snapshots at boundaries inside a prompt (torch-free: the real Scheduler, PrefixCache and hooks with the
value-keeping ListCopier): a prefill chunk ends exactly at a structural boundary, the state there is saved under
the ids up to it, and a later prompt sharing only that part resumes there at the exact token. Raw prompts get
interval snapshots only for a prefix that comes a second time. The index is a radix trie: checked against a dict."""

from __future__ import annotations

import random

import pytest

from model.engine.prefix_cache import DEVICE, PrefixCache, Snapshot
from model.engine.scheduler import Scheduler
from model.engine.sequence import checked
from model.engine.token_trie import TokenTrie
from model.runtime.blocks import SlotAllocator
from model.types import EngineConfig, GenerationRequest, SamplingParams
from tests.fakes import BS, ListCopier


def make(slots=2, blocks=64, chunk=64, device=10**9, host=10**9, **cfg):
    alloc = SlotAllocator(slots, blocks, BS)
    cop = ListCopier(slots, blocks)
    cache = PrefixCache(alloc, cop, device, host)
    config = EngineConfig(max_concurrent_seqs=slots, max_step_tokens=256, prefill_chunk_tokens=chunk,
                          max_input_tokens=400, max_total_tokens=500, **cfg)
    return Scheduler(config, alloc, cache, eos_token_id=0), cop, cache, config


def serve(sched, cop, config, prompt, snapshot_at=None, max_new=2):
    """Run one request to its end; returns (its sequence, the (start, end) of each prefill chunk it ran)."""
    req = GenerationRequest(tuple(prompt), SamplingParams(max_new_tokens=max_new), snapshot_at=snapshot_at)
    s = checked(req, config, 10**6, 10**6)
    sched.add(s)
    chunks = []
    while sched.has_work():
        seqs, batch = sched.schedule()
        for c in batch.chunks:
            cop.feed(sched.allocator, c.slot, c.start, c.token_ids)
            if c.kind.value != "decode":
                chunks.append((c.start, c.start + len(c.token_ids)))
        sched.postprocess(seqs, [7 if c.want_logits else None for c in batch.chunks])
    return s, chunks


def rand(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


def test_chunk_ends_at_the_boundary_and_a_shared_system_part_resumes_there():
    sched, cop, cache, cfg = make(snapshot_boundary_tokens=40)
    system = rand(100, 1)
    a, chunks = serve(sched, cop, cfg, system + rand(30, 2), snapshot_at=(100,))
    assert chunks == [(0, 64), (64, 100), (100, 130)]  # cut at 100, not 128
    snap = cache.trie.get(tuple(system))
    assert snap is not None and snap.data == tuple(system)  # the state holds exactly the system part
    assert cache.counters["snapshots_boundary"] == 1
    b, chunks = serve(sched, cop, cfg, system + rand(25, 3), snapshot_at=(100,))
    assert b.cached_tokens == 100 and chunks == [(100, 125)]  # resumed at the exact token
    assert cache.counters["snapshots_boundary"] == 1  # the boundary was already passed: not taken again


def test_a_boundary_shorter_than_the_minimum_or_at_the_end_is_ignored():
    sched, cop, cache, cfg = make(snapshot_boundary_tokens=256)
    p = rand(100, 4)
    _, chunks = serve(sched, cop, cfg, p, snapshot_at=(50, 100))
    assert chunks == [(0, 64), (64, 100)] and cache.counters["snapshots_boundary"] == 0
    sched, cop, cache, cfg = make(snapshot_boundary_tokens=10)
    _, chunks = serve(sched, cop, cfg, p, snapshot_at=(100, 50, 500))
    assert chunks == [(0, 50), (50, 100)] and cache.counters["snapshots_boundary"] == 1


def test_raw_prompts_get_interval_snapshots_once_their_prefix_comes_again():
    sched, cop, cache, cfg = make(snapshot_interval_tokens=32)
    shared = rand(70, 5)
    _, chunks = serve(sched, cop, cfg, shared + rand(20, 6))  # first sight: no cut, no interval snapshot
    assert chunks == [(0, 64), (64, 90)] and cache.counters["snapshots_boundary"] == 0
    b, chunks = serve(sched, cop, cfg, shared + rand(20, 7))  # second: snapshots at 32 and 64
    assert b.cached_tokens == 0 and chunks == [(0, 32), (32, 64), (64, 90)]
    assert cache.counters["snapshots_boundary"] == 2 and cache.trie.get(tuple(shared[:64])).data == tuple(shared[:64])
    c, chunks = serve(sched, cop, cfg, shared + rand(20, 8))
    assert c.cached_tokens == 64 and chunks == [(64, 90)]
    off = make(snapshot_interval_tokens=0)
    for seed in (6, 7):
        _, chunks = serve(off[0], off[1], off[3], shared + rand(20, seed))
        assert chunks == [(0, 64), (64, 90)]
    assert off[2].counters["snapshots_boundary"] == 0


def test_chat_prompts_without_boundaries_get_no_interval_snapshots():
    sched, cop, cache, cfg = make(snapshot_interval_tokens=32)
    p = rand(90, 9)
    for _ in range(2):
        _, chunks = serve(sched, cop, cfg, p, snapshot_at=())
        assert chunks == [(0, 64), (64, 90)]
    assert cache.counters["snapshots_boundary"] == 0


def test_the_index_is_freed_with_its_snapshots():
    sched, cop, cache, cfg = make(snapshot_boundary_tokens=16)
    for i in range(6):
        serve(sched, cop, cfg, rand(40, 10) + rand(30, 11 + i), snapshot_at=(40,))
    st = cache.stats()
    assert st["bytes_index"] > 0 and st["index_nodes"] > 0
    cache.clear()
    st = cache.stats()
    assert st["bytes_index"] == 0 and st["index_nodes"] == 0 and not cache.trie.root.children


def test_evictions_of_snapshots_that_served_no_one_are_counted():
    # host tier only, room for ~3 snapshots of ~40 tokens: one-off prompts push each other out unused, while the
    # shared system part, hit by every request, stays (LRU: a hit makes it the most recent)
    sched, cop, cache, cfg = make(device=0, host=3 * (100 + 45 * 40 // BS), snapshot_boundary_tokens=16)
    system = rand(20, 20)
    for i in range(8):
        s, _ = serve(sched, cop, cfg, system + rand(20, 30 + i), snapshot_at=(20,), max_new=1)
        assert s.cached_tokens == (20 if i else 0)
    c = cache.counters
    assert c["evictions"] > 0 and c["evictions_unused"] == c["evictions"]  # only the one-off prompts' went
    assert cache.trie.get(tuple(system)).hits == 7


def test_radix_trie_matches_a_dict_under_random_puts_and_removes():
    rng = random.Random(0)
    trie, ref = TokenTrie(), {}
    pool = [tuple(rng.randrange(4) for _ in range(rng.randint(1, 12))) for _ in range(300)]
    for _ in range(3000):
        ids = rng.choice(pool)
        if ids in ref and rng.random() < 0.5:
            trie.remove(ids)
            del ref[ids]
        elif ids not in ref:
            ref[ids] = Snapshot(ids, DEVICE, None)
            trie.put(ref[ids])
        probe = rng.choice(pool) + (rng.randrange(4),)
        assert trie.get(ids) is ref.get(ids)
        want = max((k for k in ref if probe[: len(k)] == k and len(k) <= len(probe) - 1), key=len, default=None)
        got = trie.longest(list(probe), len(probe) - 1)
        assert (got.ids if got else None) == want
    assert trie.edge_tokens <= sum(len(k) for k in ref) and trie.nodes <= 2 * len(ref)
    for ids in list(ref):
        trie.remove(ids)
    assert not trie.root.children and trie.nodes == 0 and trie.edge_tokens == 0
    with pytest.raises(KeyError):
        trie.remove((1, 2))


def test_the_index_costs_a_few_bytes_a_token_and_its_estimate_bounds_it():
    # a node per token (a dict + an object each) cost ~230 bytes a token: RSS that no tier accounted for
    import tracemalloc

    rng = random.Random(1)
    keys = [tuple(rng.randrange(300, 50_000) for _ in range(400)) for _ in range(100)]
    snaps = [Snapshot(k, DEVICE, None) for k in keys]
    tokens = sum(map(len, keys))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        trie = TokenTrie()
        for s in snaps:
            trie.put(s)
        index = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert index / tokens < 8, index / tokens  # packed edges: 4 bytes a token + a few nodes
    # the reported estimate covers the keys themselves too (the ids tuples and their int objects)
    from model.engine.prefix_cache import INDEX_BYTES_PER_TOKEN

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fresh = [tuple(rng.randrange(300, 50_000) for _ in range(400)) for _ in range(100)]
        keys_bytes = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert keys_bytes + index <= INDEX_BYTES_PER_TOKEN * tokens and len(fresh) == 100
