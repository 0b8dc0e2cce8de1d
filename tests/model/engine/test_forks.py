"""Fork groups in the engine's control flow (scripted fake runner, real allocator): admission all or nothing,
queue places per row, rows failing with their leader, the shared KV blocks refcounted; nothing leaks."""

from __future__ import annotations

import threading
import time

import pytest

from model.engine import forks
from model.engine.scheduler import Scheduler
from model.engine.sequence import Sequence
from model.runtime.blocks import SlotAllocator
from model.types import ChunkKind, EngineConfig, FailureKind, FinishReason, QueueFull
from tests.fakes import BS, ENGINES, ListCopier, check_pools_and_shut_down, fake_engine, req


@pytest.fixture(autouse=True)
def nothing_leaks():
    ENGINES.clear()
    yield
    check_pools_and_shut_down(ENGINES)


def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.005)
    assert cond()


def test_group_admitted_only_when_every_row_fits():
    eng = fake_engine(slots=3)
    eng.runner.gate = threading.Event()  # hold the loop inside step()
    long = eng.submit(req("ab", max_new_tokens=5))
    wait_for(lambda: eng.stats()["running"] == 1)
    hs = eng.submit_n(req("cde", max_new_tokens=3), 3)
    time.sleep(0.05)
    s = eng.stats()
    assert s["free_slots"] == 2 and s["waiting"] == 1  # two slots free, but the group needs three: none taken
    eng.runner.gate.set()
    assert long.result().generated_tokens == 5
    outs = [h.result() for h in hs]
    assert [c.text for c in outs] == ["fgh"] * 3  # fake: next = last + 1
    fed = [c.token_ids for b in eng.runner.batches for c in b.chunks if c.kind != ChunkKind.DECODE]
    cde = req("cde").prompt_ids
    assert fed.count(cde[:2]) == 1 and fed.count(cde[2:]) == 3  # one prefill to the fork point; each row its last


def test_rows_take_queue_places():
    eng = fake_engine(slots=4, max_queued_requests=4)
    eng.runner.gate = threading.Event()
    busy = [eng.submit(req("a", max_new_tokens=2)) for _ in range(4)]
    wait_for(lambda: eng.stats()["running"] == 4)
    hs = eng.submit_n(req("a", max_new_tokens=2), 3)  # 3 of the 4 queue places
    with pytest.raises(QueueFull):
        eng.submit_n(req("b", max_new_tokens=2), 2)  # all or nothing: 2 more do not fit
    more = eng.submit(req("b", max_new_tokens=2))  # 1 does
    eng.runner.gate.set()
    assert all(h.result().generated_tokens == 2 for h in [*busy, *hs, more])


def test_rows_waiting_on_a_failed_leader_fail_with_it():
    eng = fake_engine(slots=3)
    eng.runner.fail_next = 1  # the leader's prefill step fails
    hs = eng.submit_n(req("abcdefghij"), 3)
    cs = [h.result() for h in hs]
    assert {c.finish_reason for c in cs} == {FinishReason.ERROR}
    assert {c.failure for c in cs} == {FailureKind.OUT_OF_MEMORY}


def test_fork_shares_full_blocks_and_copies_state():
    cfg = EngineConfig(max_concurrent_seqs=3, max_input_tokens=100, max_total_tokens=200)
    alloc, copier = SlotAllocator(3, 64, BS), ListCopier(3, 64)
    sched = Scheduler(cfg, alloc, copier=copier)
    prompt = tuple(range(10, 21))  # 11 tokens: fork point 10, two full blocks of 4 and a partial one
    leader = Sequence(req(prompt, max_new_tokens=3))
    leader.forks = [Sequence(req(prompt, max_new_tokens=3)) for _ in range(2)]
    for row in leader.forks:
        row.leader = leader
    sched.add(leader)
    seqs, batch = sched.schedule()
    assert seqs == [leader] and batch.chunks[0].token_ids == prompt[:10] and not batch.chunks[0].want_logits
    copier.feed(alloc, leader.slot, 0, prompt[:10])
    sched.postprocess(seqs, [None])
    rows = leader.forks or [s for s in sched.running if s is not leader]
    assert len(rows) == 2 and all(r.num_computed == 10 and r.leader is None for r in rows)
    lt = alloc.block_table(leader.slot)
    for r in rows:
        t = alloc.block_table(r.slot)
        assert t[:2] == lt[:2] and t[2] != lt[2]  # full blocks shared, the partial one its own
        assert copier.state[r.slot] == list(prompt[:10]) and copier.kv_of(alloc, r.slot, 10) == list(prompt[:10])
    assert alloc.refcount(lt[0]) == 3
    seqs, batch = sched.schedule()  # each row feeds the prompt's last token itself
    assert sorted(c.slot for c in batch.chunks) == sorted(s.slot for s in [leader, *rows])
    assert all(c.token_ids == prompt[10:] and c.start == 10 and c.want_logits for c in batch.chunks)
    for s in sched.abort_all():
        assert s.slot is None
    assert alloc.num_free_blocks == 64 and alloc.num_free_slots == 3


def test_group_needing_more_than_the_pool_is_refused():
    eng = fake_engine(slots=4, blocks=20)  # 80 tokens of KV (blocks of 4)
    with pytest.raises(Exception) as e:
        eng.submit_n(req("abcdefgh", max_new_tokens=40), 4)
    assert getattr(e.value, "status", None) == 422 and "KV blocks" in str(e.value)
    assert forks.fork_point(Sequence(req("abc"))) == 2
