"""When snapshots are taken (model/engine/prefix_hooks.py), torch-free: the real Scheduler and PrefixCache with the
value-keeping ListCopier, steps simulated by feeding the copier. A snapshot holds exactly the tokens folded into
the slot, and a sequence whose end is found while its next step runs waits for that step (settled)."""

from __future__ import annotations

import threading

from model.engine.prefix_cache import PrefixCache
from model.engine.prefix_hooks import PrefixHooks, PrefixSessions
from model.engine.scheduler import Scheduler, SeqStatus, Sequence
from model.runtime.blocks import SlotAllocator
from model.types import EngineConfig, FinishReason, GenerationRequest, SamplingParams
from tests.fakes import BS, ListCopier


def make(slots=2, blocks=32):
    alloc = SlotAllocator(slots, blocks, BS)
    cop = ListCopier(slots, blocks)
    cache = PrefixCache(alloc, cop, 10**9, 10**9)
    cfg = EngineConfig(max_concurrent_seqs=slots, max_step_tokens=64, prefill_chunk_tokens=64)
    return Scheduler(cfg, alloc, cache, eos_token_id=0), cop, cache


def seq(prompt, max_new=8, session=None):
    return Sequence(GenerationRequest(tuple(prompt), SamplingParams(max_new_tokens=max_new), session_id=session))


def step(sched, cop, token=7, launched=True):
    """Schedule, 'run' the step (feed the copier, as the device would), return (seqs, tokens) uncollected."""
    seqs, batch = sched.schedule()
    for c in batch.chunks:
        cop.feed(sched.allocator, c.slot, c.start, c.token_ids)
    if launched:
        sched.launched(seqs)
    return seqs, [token if c.want_logits else None for c in batch.chunks]


def collect(sched, seqs, tokens):
    sched.settled(ok=True)
    sched.postprocess(seqs, tokens)


def test_prompt_snapshot_after_its_last_chunk_and_end_snapshot_before_the_free():
    sched, cop, cache = make()
    s = seq([1, 2, 3, 4, 5], max_new=3, session="s1")
    sched.add(s)
    collect(sched, *step(sched, cop))  # prefill: the prompt's snapshot
    assert cache.trie.get((1, 2, 3, 4, 5)) is not None and s.output_ids == [7]
    collect(sched, *step(sched, cop, 8))
    collect(sched, *step(sched, cop, 9))  # the third token: LENGTH, snapshot, then the slot is freed
    assert s.status == SeqStatus.FINISHED and s.finish_reason == FinishReason.LENGTH
    end = cache.trie.get((1, 2, 3, 4, 5, 7, 8))  # every token but the last, which never went through
    assert end is not None and end.pins == {"s1"} and cache.conversation("s1") == (1, 2, 3, 4, 5, 7, 8, 9)
    assert sched.allocator.num_free_slots == 2


def test_an_end_found_while_its_next_step_runs_waits_for_that_step():
    sched, cop, cache = make()
    s = seq([1, 2, 3], session="s2")
    sched.add(s)
    collect(sched, *step(sched, cop, 7))
    collect(sched, *step(sched, cop, 8))  # output [7, 8]; state holds 1 2 3 7
    running = step(sched, cop, 9)  # the next step feeds 8 and is in flight
    assert not sched.hooks.finished(s, FinishReason.STOP)  # a stop string in 8's text: deferred
    assert s.status == SeqStatus.RUNNING and s.slot is not None
    collect(sched, *running)  # settled: the step fed 8, so the snapshot holds the whole conversation
    assert s.status == SeqStatus.FINISHED and s.output_ids == [7, 8, 9]  # 9 is dropped by the engine
    assert cache.trie.get((1, 2, 3, 7, 8)).pins == {"s2"}
    assert sched.allocator.num_free_slots == 2


def test_a_failed_step_frees_its_deferred_sequences_without_a_snapshot():
    sched, cop, cache = make()
    s = seq([1, 2, 3])
    sched.add(s)
    collect(sched, *step(sched, cop))
    step(sched, cop)
    taken = cache.counters["snapshots_taken"]
    assert not sched.hooks.finished(s, FinishReason.EOS)
    sched.settled(ok=False)
    assert s.status == SeqStatus.FINISHED and cache.counters["snapshots_taken"] == taken
    assert sched.allocator.num_free_slots == 2


def test_unclean_and_cancelled_ends_are_not_snapshotted():
    sched, cop, cache = make()
    a, b = seq([1, 2, 3]), seq([4, 5, 6])
    for s in (a, b):
        sched.add(s)
    collect(sched, *step(sched, cop, launched=False))
    taken = cache.counters["snapshots_taken"]
    b.cancelled = True
    sched.end(a, FinishReason.ERROR)
    sched.end(b, FinishReason.LENGTH)
    assert cache.counters["snapshots_taken"] == taken and sched.allocator.num_free_slots == 2


def test_without_a_prefix_cache_every_hook_is_a_no_op():
    hooks, s = PrefixHooks(None), seq([1, 2])
    s.slot = 0
    hooks.launched([s])
    hooks.prefilled([s])
    assert hooks.finished(s, FinishReason.STOP) and hooks.settled(ok=True) == []
    sessions = PrefixSessions(threading.Condition())
    assert sessions.conversation("x") is None and sessions.release("x") is False and sessions.clear() == 0


def test_sessions_over_the_cache():
    sched, cop, cache = make()
    sessions = PrefixSessions(threading.Condition(), cache)
    sched.add(seq([1, 2, 3], max_new=2, session="s3"))
    while sched.has_work():
        collect(sched, *step(sched, cop))
    assert sessions.conversation("s3") == (1, 2, 3, 7, 7)
    assert sessions.release("s3") and not sessions.release("s3") and sessions.conversation("s3") is None
    n = len(cache.lru)
    assert n == 2 and sessions.clear() == n and not cache.lru  # the prompt's and the end's, now unpinned


def test_a_sequence_resumes_only_from_its_own_namespace():
    sched, cop, cache = make(slots=1)
    p = [1, 2, 3, 4, 5, 6]

    def served(ns):
        s = Sequence(GenerationRequest(tuple(p + [9]), SamplingParams(max_new_tokens=2)), namespace=ns)
        sched.add(s)
        while sched.has_work():
            collect(sched, *step(sched, cop))
        return s.cached_tokens

    first = Sequence(GenerationRequest(tuple(p), SamplingParams(max_new_tokens=2)), namespace="adapter-a")
    sched.add(first)
    while sched.has_work():
        collect(sched, *step(sched, cop))
    assert [s.namespace for s in cache.lru.values()] == ["adapter-a", "adapter-a"]
    assert served("") == 0 and served("adapter-b") == 0  # the same ids, other namespaces
    assert served("adapter-a") == len(p)  # its own: resumed after the prompt
