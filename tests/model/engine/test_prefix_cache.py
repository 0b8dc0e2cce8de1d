"""PrefixCache policy (torch-free): longest strict-prefix match, block sharing, tiers, LRU, pins, leaks.
The copier here keeps plain Python values, so every copy the policy asks for is checked by value."""

from __future__ import annotations

import random

import pytest

from model.engine.prefix_cache import DEVICE, HOST, PrefixCache
from model.engine.token_trie import TokenTrie
from model.runtime.blocks import SlotAllocator
from tests.fakes import BS, ListCopier


def make(slots=4, blocks=64, device=10_000, host=10_000):
    alloc = SlotAllocator(slots, blocks, BS)
    cop = ListCopier(slots, blocks)
    return alloc, cop, PrefixCache(alloc, cop, device, host)


def run(alloc, cop, cache, prompt, new=(), reserve=None, session=None):
    """Admit, feed the rest of the prompt, snapshot it, decode `new`, snapshot the end, free. -> cached."""
    got = cache.admit(prompt, reserve or len(prompt) + len(new) + 1)
    assert got is not None
    slot, n = got
    if n == 0:
        cop.state[slot] = []  # a fresh sequence starts from zero state
    assert cop.state[slot] == list(prompt[:n]), "restored state is the snapshot's"
    assert cop.kv_of(alloc, slot, n) == list(prompt[:n]), "restored KV is the snapshot's"
    cop.feed(alloc, slot, n, prompt[n:])
    cache.take(slot, prompt)
    toks = list(prompt)
    for t in new[:-1]:
        cop.feed(alloc, slot, len(toks), [t])
        toks.append(t)
    cache.take(slot, toks, session, list(prompt) + list(new))
    alloc.free(slot)
    return n


def test_trie_longest_and_remove():
    from model.engine.prefix_cache import Snapshot
    t = TokenTrie()
    for ids in [(1, 2), (1, 2, 3, 4), (5,)]:
        t.put(Snapshot(ids, DEVICE, None))
    assert t.longest((1, 2, 3, 4, 5), 5).ids == (1, 2, 3, 4)
    assert t.longest((1, 2, 3, 4), 3).ids == (1, 2)  # max_len: strict prefix
    assert t.longest((1, 3), 2) is None and t.longest((9,), 1) is None
    t.remove((1, 2, 3, 4))
    assert t.longest((1, 2, 3, 4, 5), 5).ids == (1, 2) and t.get((1, 2, 3)) is None and t.nodes == 2
    t.remove((1, 2))
    assert 1 not in t.root.children and t.get((5,)) is not None


@pytest.mark.parametrize("plen", [5, 8, 9, 13])  # mid-block and block-aligned snapshot lengths
def test_resume_shares_full_blocks_and_copies_the_partial_one(plen):
    alloc, cop, cache = make()
    p = list(range(10, 10 + plen))
    assert run(alloc, cop, cache, p, new=[1, 2, 3]) == 0
    q = p + [1, 2, 77, 78, 79]  # the first turn's output but its last token, then more
    slot, n = cache.admit(q, len(q) + 4)
    assert n == plen + 2 and cache.counters["hits"] == 1 and cache.counters["tokens_reused"] == n
    snap = cache.trie.get(tuple(q[:n]))
    table = alloc.block_table(slot)
    full = n // BS
    assert table[:full] == list(snap.blocks[:full])  # shared by reference
    if n % BS:
        assert table[full] != snap.blocks[full]  # a copy: the resumed sequence writes into it
    for b in table[:full]:
        assert alloc.refcount(b) >= 2
    cop.feed(alloc, slot, n, q[n:])
    alloc.free(slot)
    s2 = cache.admit(p + [1, 2, 3, 4], plen + 5)  # the snapshot's KV is untouched by the resumed sequence
    assert cop.kv_of(alloc, s2[0], s2[1]) == (p + [1, 2])[: s2[1]]
    alloc.free(s2[0])


def test_prompt_equal_to_a_snapshot_backs_off_to_a_shorter_one():
    alloc, cop, cache = make()
    p = list(range(1, 8))
    run(alloc, cop, cache, p, new=[50, 51])
    # p + [50] is exactly the end-of-generation snapshot: it cannot be resumed (>= 1 token must be fed)
    assert run(alloc, cop, cache, p + [50], new=[9]) == len(p)
    assert run(alloc, cop, cache, p, new=[9]) == 0  # nothing strictly shorter: a miss
    assert cache.counters["misses"] == 2 and cache.counters["hits"] == 1


def test_device_budget_moves_lru_to_host_and_host_budget_evicts():
    # device holds ~1 snapshot (state 100 + KV blocks 40 each), host ~2
    alloc, cop, cache = make(device=300, host=2 * (100 + 10 * 9))
    convs = [[100 * (i + 1) + j for j in range(8)] for i in range(4)]
    for c in convs:
        run(alloc, cop, cache, c)
    st = cache.stats()
    assert st["bytes_device"] <= 300 and st["bytes_host"] <= cache.host_budget
    assert st["demotions"] >= 3 and st["evictions"] >= 1
    # the most recent conversation is on the device, older ones on the host or gone
    assert cache.trie.get(tuple(convs[-1])).tier == DEVICE
    assert cache.trie.get(tuple(convs[0])) is None
    # a host-tier snapshot resumes exactly (one packed copy)
    host = [s for s in cache.lru.values() if s.tier == HOST][-1]
    assert run(alloc, cop, cache, list(host.ids) + [5, 6]) == len(host.ids)


def test_admission_evicts_snapshots_instead_of_waiting():
    alloc, cop, cache = make(slots=2, blocks=8, device=10**9, host=0)
    run(alloc, cop, cache, list(range(1, 20)))  # holds 5 blocks
    assert alloc.num_free_blocks == 3
    slot, n = cache.admit(list(range(50, 70)), 30)  # needs all 8 blocks
    assert n == 0 and cache.counters["evictions"] >= 1 and alloc.num_free_blocks == 0
    alloc.free(slot)
    assert alloc.num_free_blocks == 8 and cache.stats()["kv_blocks_held"] == 0


def test_admission_waits_only_for_running_sequences():
    alloc, cop, cache = make(slots=2, blocks=8)
    busy = cache.admit(list(range(1, 5)), 32)  # a running sequence holds every block
    assert busy is not None and cache.admit([7, 8, 9], 4) is None
    alloc.free(busy[0])
    assert cache.admit([7, 8, 9], 4) is not None


def test_hit_whose_own_blocks_are_needed_resumes_from_host():
    alloc, cop, cache = make(slots=2, blocks=6, device=10**9, host=10**9)
    p = list(range(1, 18))  # 5 blocks held by its snapshot
    run(alloc, cop, cache, p)
    slot, n = cache.admit(p + [3, 4, 5, 6, 7, 8], 24)  # 6 blocks: the 4 shared ones + 2 do not fit
    assert n == len(p) and cache.trie.get(tuple(p)).tier == HOST
    assert cop.kv_of(alloc, slot, n) == p
    alloc.free(slot)


def test_pinned_session_snapshot_is_never_dropped():
    alloc, cop, cache = make(device=0, host=250)
    run(alloc, cop, cache, [1, 2, 3, 4, 5], new=[6, 7], session="s1")
    assert cache.conversation("s1") == (1, 2, 3, 4, 5, 6, 7)
    for i in range(6):
        run(alloc, cop, cache, [40 + i] * 9)
    pinned = cache.trie.get((1, 2, 3, 4, 5, 6))
    assert pinned is not None and pinned.pins == {"s1"} and cache.counters["evictions"] > 0
    assert run(alloc, cop, cache, [1, 2, 3, 4, 5, 6, 7, 8]) == 6
    assert cache.release_session("s1") and not cache.release_session("s1")
    assert cache.conversation("s1") is None


def test_soak_nothing_leaks():
    rng = random.Random(0)
    alloc, cop, cache = make(slots=3, blocks=40, device=800, host=1500)
    convs: list[list[int]] = [[] for _ in range(12)]
    for _ in range(200):
        i = rng.randrange(len(convs))
        prompt = convs[i] + [rng.randrange(1, 50) for _ in range(rng.randint(1, 6))]
        new = [rng.randrange(1, 50) for _ in range(rng.randint(1, 4))]
        if len(prompt) + len(new) > 60:
            convs[i] = []
            continue
        run(alloc, cop, cache, prompt, new)
        convs[i] = prompt + new
        st = cache.stats()
        assert st["bytes_device"] <= 800 and st["bytes_host"] <= 1500
    st = cache.stats()
    assert st["evictions"] > 0 and st["hits"] > 0
    cache.clear()
    assert alloc.num_free_blocks == 40 and alloc.num_free_slots == 3
    assert cache.stats()["bytes_device"] == cache.stats()["bytes_host"] == 0 and not cache.lru
    assert not cache.trie.root.children


def test_end_of_generation_snapshot_supersedes_the_prompt_one():
    alloc, cop, cache = make(device=10**9)
    slot, _ = cache.admit([1, 2, 3, 4, 5], 9)
    cop.feed(alloc, slot, 0, [1, 2, 3, 4, 5])
    cache.take(slot, [1, 2, 3, 4, 5])
    other, _ = cache.admit([9, 9, 9], 4)
    cop.feed(alloc, other, 0, [9, 9, 9])
    cache.take(other, [9, 9, 9])
    cop.feed(alloc, slot, 5, [6])
    cache.take(slot, [1, 2, 3, 4, 5, 6], supersedes=[1, 2, 3, 4, 5])
    assert [s.ids for s in cache.lru.values()] == [(1, 2, 3, 4, 5), (9, 9, 9), (1, 2, 3, 4, 5, 6)]
    alloc.free(slot)
    alloc.free(other)
    cache.clear()
    assert alloc.num_free_blocks == 64


def test_a_failing_copy_drops_the_snapshot_and_never_fails_admission():
    alloc, cop, cache = make(device=10**9, host=10**9)
    run(alloc, cop, cache, [1, 2, 3, 4, 5, 6])

    def boom(*a):
        raise MemoryError("no room to stage")

    cop.restore_device = boom
    slot, n = cache.admit([1, 2, 3, 4, 5, 6, 7], 8)
    assert n == 0 and not cache.lru and cache.counters["evictions"] == 1
    alloc.free(slot)
    run(alloc, cop, cache, [8, 9, 10])
    cop.to_host = boom
    cache.device_budget = 0
    cache._fit()  # cannot move to the host: dropped instead
    assert not cache.lru and alloc.num_free_blocks == 64


def test_policy_modules_are_torch_free():
    import subprocess
    import sys

    code = ("import sys, model.engine.prefix_cache, model.engine.token_trie, model.runtime.blocks, model.engine.scheduler; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- namespaces: (namespace, ids) is the key; a snapshot never serves another namespace ----------------------

def run_ns(alloc, cop, cache, ns, prompt, new=()):
    """`run` in a namespace: the copier's state and KV hold (namespace, id) pairs, so a resume from another
    namespace's snapshot would show in the restored values."""
    got = cache.admit(prompt, len(prompt) + len(new) + 1, namespace=ns)
    assert got is not None
    slot, n = got
    if n == 0:
        cop.state[slot] = []
    tagged = [(ns, t) for t in prompt]
    assert cop.state[slot] == tagged[:n] and cop.kv_of(alloc, slot, n) == tagged[:n], "another namespace's state"
    cop.feed(alloc, slot, n, tagged[n:])
    cache.take(slot, prompt, namespace=ns)
    toks = list(prompt)
    for t in new[:-1]:
        cop.feed(alloc, slot, len(toks), [(ns, t)])
        toks.append(t)
    cache.take(slot, toks, supersedes=prompt, namespace=ns)
    alloc.free(slot)
    return n


def test_two_namespaces_never_share_a_snapshot():
    from model.engine.prefix_cache import DEFAULT_NAMESPACE

    alloc, cop, cache = make()
    p = [1, 2, 3, 4, 5, 6]
    assert run_ns(alloc, cop, cache, "adapter-a", p, new=[7, 8]) == 0
    assert run_ns(alloc, cop, cache, DEFAULT_NAMESPACE, p + [7, 9]) == 0  # the same ids, another namespace: a miss
    assert run_ns(alloc, cop, cache, "adapter-b", p + [7, 9]) == 0
    assert run_ns(alloc, cop, cache, "adapter-a", p + [7, 9]) == len(p) + 1  # its own: resumed
    assert run_ns(alloc, cop, cache, DEFAULT_NAMESPACE, p + [7, 9, 10]) == len(p) + 2
    same = [s for s in cache.lru.values() if s.ids == (*p, 7, 9)]
    assert sorted(s.namespace for s in same) == ["", "adapter-a", "adapter-b"]  # one snapshot per namespace
    assert cache.trie.get((*p, 7, 9)).namespace == DEFAULT_NAMESPACE and cache.trie.get(tuple(p)) is None
    cache.clear()
    assert alloc.num_free_blocks == 64 and set(cache._tries) == {DEFAULT_NAMESPACE}  # emptied ones are gone


def test_namespaces_under_pressure_never_cross():
    rng = random.Random(1)
    alloc, cop, cache = make(slots=3, blocks=40, device=800, host=1500)
    spaces = ["", "a", "b"]
    convs = {ns: [[] for _ in range(4)] for ns in spaces}
    for _ in range(150):
        ns = rng.choice(spaces)
        i = rng.randrange(4)
        shared = [1, 2, 3] if rng.random() < 0.5 else []  # the same ids in every namespace
        prompt = (convs[ns][i] or shared) + [rng.randrange(1, 20) for _ in range(rng.randint(1, 5))]
        new = [rng.randrange(1, 20) for _ in range(rng.randint(1, 3))]
        if len(prompt) + len(new) > 50:
            convs[ns][i] = []
            continue
        run_ns(alloc, cop, cache, ns, prompt, new)  # checks every restored value is this namespace's
        convs[ns][i] = prompt + new
    assert cache.counters["hits"] > 0 and cache.counters["evictions"] > 0
    cache.clear()
    assert alloc.num_free_blocks == 40
