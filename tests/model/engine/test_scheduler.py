"""Scheduler logic without a model: a fake step loop feeds made-up tokens back."""

from __future__ import annotations

import itertools
import random
import sys

import pytest

from model.engine.scheduler import MIN_PREFILL_TOKENS, Scheduler, SeqStatus, Sequence
from model.runtime.blocks import SlotAllocator
from model.types import ChunkKind, EngineConfig, GenerationRequest, QueueFull, SamplingParams, SeqChunk

SHARE = 1.5  # prefill_time_share of the time-bounded tests (off by default)

def make_seq(n_prompt: int, max_new: int = 4, base: int = 0) -> Sequence:
    ids = tuple(base + i for i in range(n_prompt))
    return Sequence(GenerationRequest(ids, SamplingParams(max_new_tokens=max_new)))


def make(slots=4, blocks=64, block_size=4, **cfg) -> tuple[Scheduler, SlotAllocator]:
    alloc = SlotAllocator(slots, blocks, block_size)
    defaults = dict(max_concurrent_seqs=slots, max_step_tokens=16, prefill_chunk_tokens=8,
                    max_queued_requests=8)
    defaults.update(cfg)
    return Scheduler(EngineConfig(**defaults), alloc), alloc


def run_step(sched: Scheduler, token: int = 7):
    """One fake step: check the chunk invariants, 'sample' `token`, finish sequences at max_new."""
    seqs, batch = sched.schedule()
    assert len(seqs) == len(batch.chunks)
    for seq, chunk in zip(seqs, batch.chunks, strict=True):
        assert chunk.slot == seq.slot and seq.status == SeqStatus.RUNNING
        assert chunk.start == seq.num_computed
        expected = (seq.prompt_ids + seq.output_ids)[chunk.start : chunk.start + len(chunk.token_ids)]
        assert list(chunk.token_ids) == expected
        assert chunk.want_logits == (chunk.start + len(chunk.token_ids) >= seq.prompt_len)
        want_kind = (ChunkKind.DECODE if seq.output_ids else
                     ChunkKind.FRESH if chunk.start == 0 else ChunkKind.CONTINUE)
        assert chunk.kind == want_kind
    sched.postprocess(seqs, [token if c.want_logits else None for c in batch.chunks])
    for seq in seqs:
        if len(seq.output_ids) >= seq.max_new_tokens:
            sched.finish(seq)
    return seqs, batch


def assert_all_free(alloc: SlotAllocator) -> None:
    assert alloc.num_free_slots == alloc.num_slots
    assert alloc.num_free_blocks == alloc.num_blocks


def test_single_sequence_prefill_then_decode():
    sched, alloc = make()
    seq = make_seq(20, max_new=3)
    sched.add(seq)
    sizes = []
    while sched.has_work():
        _, batch = run_step(sched)
        sizes.append([len(c.token_ids) for c in batch.chunks])
    # 20 prompt tokens in chunks of 8, then 2 decode steps (first token comes from the last prefill chunk).
    assert sizes == [[8], [8], [4], [1], [1]]
    assert seq.output_ids == [7, 7, 7] and seq.status == SeqStatus.FINISHED and seq.slot is None
    assert_all_free(alloc)


def test_step_budget_and_decodes_flow_during_long_prefill():
    sched, alloc = make(slots=4, blocks=200, max_step_tokens=10, prefill_chunk_tokens=6)
    short = make_seq(2, max_new=30)
    sched.add(short)
    run_step(sched)  # short prefilled, decoding from now on
    long = make_seq(100, max_new=2, base=1000)
    sched.add(long)
    long_steps = 0
    while long.is_prefilling:
        seqs, batch = run_step(sched)
        total = sum(len(c.token_ids) for c in batch.chunks)
        assert total <= 10
        # The decoding sequence gets its token every step, first in the batch.
        assert seqs[0] is short and len(batch.chunks[0].token_ids) == 1
        assert all(len(c.token_ids) <= 6 for c in batch.chunks)
        long_steps += 1
    assert long_steps == -(-100 // 6)
    while sched.has_work():
        run_step(sched)
    assert_all_free(alloc)


def test_prefill_fills_budget_with_several_sequences():
    sched, _ = make(slots=4, max_step_tokens=16, prefill_chunk_tokens=8)
    a, b, c = make_seq(5), make_seq(9), make_seq(9)
    for s in (a, b, c):
        sched.add(s)
    seqs, batch = sched.schedule()
    # a whole (5) + b chunk (8) + c gets the 3 left over
    assert [s is x for s, x in zip(seqs, (a, b, c), strict=True)] == [True] * 3
    assert [len(ch.token_ids) for ch in batch.chunks] == [5, 8, 3]
    assert [ch.want_logits for ch in batch.chunks] == [True, False, False]


def test_fifo_admission_by_slots_and_tokens():
    # 2 slots, 10 blocks of 4 tokens = 40 tokens of KV.
    sched, alloc = make(slots=2, blocks=10, block_size=4, max_step_tokens=64)
    big = make_seq(30, max_new=6)  # 36 tokens -> 9 blocks
    small1, small2 = make_seq(2, max_new=2), make_seq(2, max_new=2)
    for s in (big, small1, small2):
        sched.add(s)
    sched.schedule()
    # small1 fits in KV terms (1 block free) but a slot is free too: it is admitted; small2 has no slot.
    assert big.status == SeqStatus.RUNNING and small1.status == SeqStatus.RUNNING
    assert small2.status == SeqStatus.WAITING
    sched2, alloc2 = make(slots=3, blocks=10, block_size=4, max_step_tokens=64)
    first, big2, later = make_seq(30, max_new=6), make_seq(30, max_new=6), make_seq(2, max_new=2)
    for s in (first, big2, later):
        sched2.add(s)
    sched2.schedule()
    # big2 does not fit; FIFO means `later` must not overtake it.
    assert big2.status == SeqStatus.WAITING and later.status == SeqStatus.WAITING
    while sched2.has_work():
        run_step(sched2)
        if later.status != SeqStatus.WAITING:
            assert big2.status != SeqStatus.WAITING
    assert_all_free(alloc2)


def test_queue_limit():
    sched, _ = make(max_queued_requests=3)
    for _ in range(3):
        sched.add(make_seq(3))
    with pytest.raises(QueueFull) as e:
        sched.add(make_seq(3))
    assert e.value.status == 429 and "limit 3" in str(e.value)
    sched.schedule()  # admits them (4 slots): the queue has room again
    sched.add(make_seq(3))


def test_cancellation_frees_slot_waiting_and_running():
    sched, alloc = make(slots=1)
    running, waiting = make_seq(10, max_new=50), make_seq(3)
    sched.add(running)
    sched.add(waiting)
    run_step(sched)
    assert running.slot is not None and waiting.status == SeqStatus.WAITING
    waiting.cancelled = True
    running.cancelled = True
    seqs, batch = sched.schedule()
    assert seqs == [] and batch.chunks == ()
    assert set(map(id, sched.drain_retired())) == {id(running), id(waiting)}
    assert sched.drain_retired() == []
    assert not sched.has_work()
    assert_all_free(alloc)
    sched.finish(running)  # idempotent
    assert_all_free(alloc)


def test_decode_fairness_when_budget_smaller_than_batch():
    sched, alloc = make(slots=4, blocks=100, max_step_tokens=4, prefill_chunk_tokens=4)
    seqs = [make_seq(1, max_new=40, base=i) for i in range(4)]
    for s in seqs:
        sched.add(s)
    run_step(sched)  # all four prefilled (1 token each)
    served = {s.seq_id: 0 for s in seqs}
    sched.config = EngineConfig(max_concurrent_seqs=4, max_step_tokens=3, prefill_chunk_tokens=3)
    for _ in range(12):
        out, _ = run_step(sched)
        assert len(out) == 3
        for s in out:
            served[s.seq_id] += 1
    assert set(served.values()) == {9}  # 36 decode tokens spread evenly over 4 sequences


def test_random_workload_never_leaks():
    rng = random.Random(0)
    sched, alloc = make(slots=3, blocks=40, block_size=4, max_step_tokens=12, prefill_chunk_tokens=5,
                        max_queued_requests=1000)
    live: list[Sequence] = []
    for _ in range(400):
        if rng.random() < 0.3:
            s = make_seq(rng.randint(1, 60), max_new=rng.randint(1, 20))
            sched.add(s)
            live.append(s)
        if live and rng.random() < 0.05:
            rng.choice(live).cancelled = True
        run_step(sched)
        held = [s for s in sched.running]
        assert alloc.num_free_slots == alloc.num_slots - len(held)
        assert len({s.slot for s in held}) == len(held)
    while sched.has_work():
        run_step(sched)
    assert all(s.status == SeqStatus.FINISHED for s in live)
    assert all(s.cancelled or len(s.output_ids) == s.max_new_tokens for s in live)
    assert_all_free(alloc)


def test_scheduler_does_not_import_torch():
    import subprocess

    code = "import sys, model.engine.scheduler; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_chunk_kind_is_explicit_and_checked():
    # A one-token prompt chunk past start 0 is a CONTINUE chunk, not a decode: the kind says so, not the shape.
    assert SeqChunk.cont(0, (5,), 3, True).kind == ChunkKind.CONTINUE
    assert SeqChunk.fresh(0, (5,), True).kind == ChunkKind.FRESH
    assert SeqChunk.decode(0, 5, 3).kind == ChunkKind.DECODE
    for bad in (lambda: SeqChunk(0, (1, 2), 3, True, ChunkKind.DECODE),  # decode feeds one token
                lambda: SeqChunk(0, (1,), 0, True, ChunkKind.DECODE),  # ... after a prompt
                lambda: SeqChunk(0, (1,), 3, True, ChunkKind.FRESH),  # fresh starts at 0
                lambda: SeqChunk(0, (1,), 0, True, ChunkKind.CONTINUE),  # continue from something
                lambda: SeqChunk(0, (), 0, True, ChunkKind.FRESH)):
        with pytest.raises(ValueError):
            bad()


def test_engine_does_not_import_torch():
    import subprocess

    code = "import sys, model.engine.engine; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_step_cost_bounds_prefill_while_decoding():
    sched, alloc = make(slots=4, blocks=256, max_step_tokens=64, prefill_chunk_tokens=64, prefill_time_share=SHARE)
    first = Sequence(GenerationRequest(tuple(range(1, 9)), SamplingParams(max_new_tokens=50)))
    sched.add(first)
    seqs, batch = sched.schedule()  # its prefill: no decodes yet, so no time bound
    sched.observe_step(seqs, 0.080)  # no decode-only time to subtract yet: not learned from
    sched.postprocess(seqs, [7])
    assert sched.cost.token_s is None
    for _ in range(3):
        seqs, _ = sched.schedule()
        sched.observe_step(seqs, 0.100)  # decode-only steps: 100 ms
        sched.postprocess(seqs, [7] * len(seqs))
    assert sched.cost.decode_s == pytest.approx(0.1) and sched.cost.token_s is None
    assert sched.cost.prefill_budget() is None  # no prefill estimate: unbounded
    sched.add(Sequence(GenerationRequest(tuple(range(1, 21)), SamplingParams(max_new_tokens=4))))
    seqs, batch = sched.schedule()
    assert [len(c.token_ids) for c in batch.chunks] == [1, 20]
    sched.observe_step(seqs, 0.300)  # 20 prefill tokens added 200 ms: 10 ms per token
    sched.postprocess(seqs, [7, 7])
    assert sched.cost.token_s == pytest.approx(0.01)
    for _ in range(2):
        sched.add(Sequence(GenerationRequest(tuple(range(1, 41)), SamplingParams(max_new_tokens=4))))
    seqs, batch = sched.schedule()
    # two decodes + prefill worth SHARE x 100 ms at 10 ms per token (at least the floor of 16)
    assert [len(c.token_ids) for c in batch.chunks] == [1, 1, max(MIN_PREFILL_TOKENS, int(SHARE * 10))]
    sched.postprocess(seqs, [7 if c.want_logits else None for c in batch.chunks])
    for s in list(sched.running):
        sched.finish(s)
    assert_all_free(alloc)


def test_step_cost_weighs_prefill_samples_by_their_tokens():
    from model.engine.scheduler import StepCost

    c = StepCost(1.0)
    c.observe(4, 0, 0.1)
    c.observe(4, 2, 0.1 + 0.010)  # 2 tokens, 5 ms each: mostly noise
    c.observe(4, 200, 0.1 + 0.200)  # 200 tokens, 1 ms each
    c.observe(0, 100, 0.08)  # prefill only: less than a decode step, so adds nothing (excess 0)
    assert c.token_s == pytest.approx(0.210 / 302)


def _simulate(timed: bool, streams=32, requests=160, seed=0):
    """A closed loop on a fake clock: `streams` clients, each sends its next prompt 5-25 ms after its last
    one ended; step time = 20 ms + 2 ms per decode row + 4 ms per prefill token (prefill dear next to
    decode, as on this CPU: untimed, TPOT p99 is ~10x p50, as measured). Returns (TTFT p50, TPOT p50,
    TPOT p99) in seconds."""
    rng = random.Random(seed)
    sched, _ = make(slots=streams, blocks=8192, block_size=16, max_step_tokens=2048, prefill_chunk_tokens=512,
                    max_queued_requests=1000, max_input_tokens=1000, max_total_tokens=2000, prefill_time_share=SHARE)
    if not timed:
        sched.cost.prefill_budget = lambda: None
    now, arrivals, sent, done, sub, stamps = 0.0, [], 0, 0, {}, {}

    def client(at):
        nonlocal sent
        sent += 1
        arrivals.append((at, Sequence(GenerationRequest(tuple(range(1, rng.randint(40, 100))),
                                                        SamplingParams(max_new_tokens=64)))))

    for _ in range(streams):
        client(rng.random() * 0.05)
    while done < requests:
        if not sched.has_work():
            now = max(now, min(a for a, _ in arrivals))
        for a, seq in [x for x in arrivals if x[0] <= now]:
            arrivals.remove((a, seq))
            sched.add(seq)
            sub[seq.seq_id], stamps[seq.seq_id] = a, []
        seqs, batch = sched.schedule()
        dt = 0.02 + 0.002 * sum(not s.is_prefilling for s in seqs) + 0.004 * sum(
            s.scheduled_tokens for s in seqs if s.is_prefilling)
        now += dt
        sched.observe_step(seqs, dt)
        sched.postprocess(seqs, [7 if c.want_logits else None for c in batch.chunks])
        for s, c in zip(seqs, batch.chunks, strict=True):
            if c.want_logits:
                stamps[s.seq_id].append(now)
                if len(s.output_ids) >= s.max_new_tokens:
                    sched.finish(s)
                    done += 1
                    client(now + 0.005 + rng.random() * 0.02)
    ttft = sorted(t[0] - sub[i] for i, t in stamps.items() if t)
    tpot = sorted(b - a for t in stamps.values() for a, b in itertools.pairwise(t))
    q = lambda xs, p: xs[int(round(p * (len(xs) - 1)))]  # noqa: E731
    return q(ttft, 0.5), q(tpot, 0.5), q(tpot, 0.99)


def test_decodes_keep_their_cadence_behind_arriving_prompts():
    ttft0, p50_0, p99_0 = _simulate(timed=False)
    ttft, p50, p99 = _simulate(timed=True)
    assert p99_0 > 5 * p50_0  # the stall this is about
    assert p99 <= 3 * p50  # bounded by time: a step with prefill <= ~2.5 decode steps
    assert ttft <= ttft0 * 1.05  # time to first token not worse


# ---- the finish rule (the one place "finished" is decided; stop strings are the engine's: they need text) ----

def test_finish_rule_eos_stop_token_and_length():
    from model.engine.scheduler import finish_rule
    from model.types import FinishReason

    def ended(out, limit=100, **params):
        seq = Sequence(GenerationRequest((5, 6, 7), SamplingParams(**{"max_new_tokens": 4, **params})))
        seq.output_ids = list(out)
        return finish_rule(seq, 0, limit)

    assert ended([9, 0]) == FinishReason.EOS
    assert ended([9, 0], ignore_eos=True) is None
    assert ended([9, 0], stop_token_ids=(0,)) == FinishReason.EOS  # EOS first
    assert ended([9, 0], stop_token_ids=(0,), ignore_eos=True) == FinishReason.STOP
    assert ended([9, 3], stop_token_ids=(3,)) == FinishReason.STOP
    assert ended([9, 0, 9, 0]) == FinishReason.EOS  # EOS wins over the length reached with it
    assert ended([9, 9, 9, 9]) == FinishReason.LENGTH  # max_new_tokens
    assert ended([9, 9], limit=5) == FinishReason.LENGTH  # the context budget: prompt + output
    assert ended([9, 9, 9]) is None


def test_postprocess_ends_a_finished_sequence_and_frees_its_slot_at_once():
    alloc = SlotAllocator(2, 16, 4)
    sched = Scheduler(EngineConfig(max_concurrent_seqs=2, max_step_tokens=16, prefill_chunk_tokens=8), alloc,
                      eos_token_id=0)
    eos = make_seq(3, max_new=10)
    goes_on = Sequence(GenerationRequest((20, 21, 22), SamplingParams(max_new_tokens=10, ignore_eos=True)))
    for s in (eos, goes_on):
        sched.add(s)
    seqs, _ = sched.schedule()
    sched.postprocess(seqs, [0, 0])  # both sample EOS; only the first stops on it
    assert eos.status == SeqStatus.FINISHED and eos.slot is None and eos.finish_reason.value == "eos_token"
    assert goes_on.status == SeqStatus.RUNNING and goes_on.finish_reason is None
    assert alloc.num_free_slots == 1  # before the next schedule()
