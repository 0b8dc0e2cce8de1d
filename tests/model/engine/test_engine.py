"""Engine tests: a scripted fake runner for the control flow (stops, cancellation, failures, limits),
the real runner + tokenizer on the tiny checkpoint for parity with Hugging Face generate."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.engine.engine import Engine
from model.engine.handle import StopBuffer
from model.types import (
    EngineConfig,
    EngineNotReady,
    FailureKind,
    FinishReason,
    GenerationRequest,
    InputTooLong,
    InvalidRequest,
    QueueFull,
    SamplingParams,
)
from tests.fakes import (
    ALPHA,
    ENGINES,
    EOS,
    FakeDetok,
    FakeRunner,
    FakeTokenizer,
    V,
    check_pools_and_shut_down,
    fake_engine,
    real_engine,
    req,
    wait_idle,
)


@pytest.fixture(autouse=True)
def pool_returns_to_free():
    """Every test: once its engines are idle, every slot and KV block is free again."""
    ENGINES.clear()
    yield
    check_pools_and_shut_down(ENGINES)


# ---- stop-string buffer (model/engine/handle.py) ----------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="abc", max_size=30), stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4),
       max_size=3), cuts=st.lists(st.integers(0, 30), max_size=10))
def test_stop_buffer_property(text, stops, cuts):
    buf = StopBuffer(tuple(stops))
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    emitted, stopped = "", False
    for a, b in zip(bounds, bounds[1:], strict=False):
        out, stopped = buf.push(text[a:b])
        emitted += out
        # nothing emitted so far contains a stop string
        assert not any(s in emitted for s in stops)
        if stopped:
            break
    # Generation stops as soon as a stop string first appears: at the first piece boundary whose prefix
    # holds one, cut before the earliest-starting stop string in that prefix (later text never exists).
    seen = next((text[:b] for b in bounds[1:] if any(s in text[:b] for s in stops)), None)
    if seen is not None:
        assert stopped and emitted == seen[: min(seen.find(s) for s in stops if s in seen)]
    else:
        assert not stopped and emitted + buf.flush() == text


# ---- fake-runner tests ----------------------------------------------------------------------------


def test_max_new_tokens_and_events():
    eng = fake_engine()
    h = eng.submit(req("abc", max_new_tokens=5))
    events = list(h)
    assert [e.token_id for e in events] == [3, 4, 5, 6, 7]
    assert "".join(e.text for e in events) == "defgh"
    assert [e.finish_reason for e in events] == [None] * 4 + [FinishReason.LENGTH]
    c = h.result()
    assert c.text == "defgh" and c.finish_reason == FinishReason.LENGTH and c.prompt_tokens == 3
    assert c.generated_tokens == 5 and c.seed is None and all(lp <= 0 for lp in c.logprobs)


def test_eos_stops_without_text_unless_ignored():
    eng = fake_engine(script={ALPHA.index("e"): EOS})
    c = eng.submit(req("abc", max_new_tokens=10)).result()
    assert c.token_ids == (3, 4, EOS) and c.text == "de" and c.finish_reason == FinishReason.EOS
    assert c.specials == (False, False, True)
    c = eng.submit(req("abc", max_new_tokens=5, ignore_eos=True)).result()
    assert c.token_ids == (3, 4, EOS, 1, 2) and c.finish_reason == FinishReason.LENGTH


def test_stop_token_ids():
    eng = fake_engine()
    c = eng.submit(req("abc", max_new_tokens=10, stop_token_ids=(6,))).result()
    assert c.token_ids == (3, 4, 5, 6) and c.text == "def" and c.finish_reason == FinishReason.STOP


def test_stop_strings_are_trimmed_and_never_leak_partially():
    eng = fake_engine()
    h = eng.submit(req("a", max_new_tokens=20, stop=("efgX", "fgh")))
    events = list(h)
    # b c d e f g h: "efg" could start "efgX" -> held back; "fgh" matches at h.
    texts = [e.text for e in events]
    assert "".join(texts) == "bcde" and events[-1].finish_reason == FinishReason.STOP
    assert texts[:3] == ["b", "c", "d"] and "f" not in "".join(texts)
    # held back text that never matched is released in order
    c = eng.submit(req("a", max_new_tokens=6, stop=("efgX",))).result()
    assert c.text == "bcdefg" and c.finish_reason == FinishReason.LENGTH
    # a stop string inside one token's text, and the earliest match wins
    c = eng.submit(req("a", max_new_tokens=20, stop=("d", "cd"))).result()
    assert c.text == "b" and c.finish_reason == FinishReason.STOP


def test_max_new_tokens_clipped_to_context():
    eng = fake_engine(max_input_tokens=20, max_total_tokens=24)
    c = eng.submit(req("abcdefghij", max_new_tokens=100)).result()
    assert c.generated_tokens == 14 and c.finish_reason == FinishReason.LENGTH


def test_submit_validation():
    eng = fake_engine(max_input_tokens=8, max_total_tokens=16)
    with pytest.raises(InputTooLong, match="limit is max_input_tokens=8"):
        eng.submit(req("abcdefghi"))
    with pytest.raises(InvalidRequest, match="empty"):
        eng.submit(req(""))
    with pytest.raises(InvalidRequest, match=r"\[0, 64\)"):
        eng.submit(req([1, 64]))
    with pytest.raises(InvalidRequest):
        eng.submit(req("ab", max_new_tokens=0))
    assert InvalidRequest.status == 400


def test_not_ready_and_load_failure():
    def boom(d, c):
        raise FileNotFoundError("no config.json in /nowhere")

    eng = Engine(Path("/nowhere"), EngineConfig(), "x", runner_factory=boom, tokenizer_factory=lambda d: 0)
    with pytest.raises(EngineNotReady, match="loading"):
        eng.submit(req("ab"))
    eng.start()
    assert eng.wait_ready(10) is False
    assert not eng.ready and "no config.json" in eng.error
    with pytest.raises(EngineNotReady, match="no config.json"):
        eng.submit(req("ab"))


def test_shutdown_during_load_never_becomes_ready():
    loading = threading.Event()

    def slow(d, c):
        loading.wait(10)
        return FakeRunner(d, c)

    eng = Engine(Path("/x"), EngineConfig(), "x", runner_factory=slow, tokenizer_factory=lambda d: FakeTokenizer())
    eng.start()
    eng.shutdown(0.1)
    loading.set()
    assert eng.wait_ready(10) is False and not eng.ready
    with pytest.raises(EngineNotReady, match="shutting down"):
        eng.submit(req("ab"))


def test_queue_full():
    eng = fake_engine(slots=1, max_queued_requests=2)
    eng.runner.gate = threading.Event()  # hold the loop inside step()
    first = eng.submit(req("a", max_new_tokens=3))
    time.sleep(0.05)
    hs = [eng.submit(req("a", max_new_tokens=3)) for _ in range(2)]
    with pytest.raises(QueueFull):
        eng.submit(req("a"))
    eng.runner.gate.set()
    for h in [first, *hs]:
        assert h.result().generated_tokens == 3


def test_cancel_running_and_waiting_frees_slots():
    eng = fake_engine(slots=1, script={t: t for t in range(V)})  # repeats its token forever
    eng.runner.delay_s = 0.002
    running = eng.submit(req("ab", max_new_tokens=150))
    waiting = eng.submit(req("cd", max_new_tokens=5))
    it = iter(running)
    assert next(it).token_id == 1
    waiting.cancel()
    running.cancel()
    running.cancel()  # idempotent
    rest = list(it)
    assert rest[-1].finish_reason == FinishReason.CANCELLED and rest[-1].token_id == -1
    cw = waiting.result()
    assert cw.finish_reason == FinishReason.CANCELLED and cw.generated_tokens == 0
    assert running.result().generated_tokens < 150
    wait_idle(eng)
    assert eng.stats()["finished_total"]["cancelled"] == 2
    assert eng.submit(req("ab", max_new_tokens=2)).result().generated_tokens == 2  # slot reusable


def test_injected_failure_fails_only_that_step_and_loop_keeps_serving():
    eng = fake_engine()
    eng.runner.gate = threading.Event()
    hs = [eng.submit(req("abc", max_new_tokens=4)) for _ in range(3)]
    eng.runner.fail_next = 1
    eng.runner.gate.set()
    results = [h.result() for h in hs]
    failed = [c for c in results if c.finish_reason == FinishReason.ERROR]
    assert failed, "the injected failure must fail the sequences of that step"
    assert all("OutOfMemoryError" in c.error and "injected" in c.error for c in failed)
    assert all(c.failure == FailureKind.OUT_OF_MEMORY for c in failed)  # a kind, not a message to match
    assert all(c.finish_reason in (FinishReason.ERROR, FinishReason.LENGTH) for c in results)
    # the engine keeps serving
    c = eng.submit(req("abc", max_new_tokens=4)).result()
    assert c.token_ids == (3, 4, 5, 6) and c.finish_reason == FinishReason.LENGTH
    assert eng.stats()["step_errors_total"] == 1 and eng.runner.failures == 1


def test_scheduler_bug_fails_queued_requests_but_loop_survives():
    eng = fake_engine()
    eng.runner.gate = threading.Event()
    real = eng.scheduler.schedule
    state = {"n": 0}

    def broken():
        state["n"] += 1
        if state["n"] == 2:
            raise KeyError("bookkeeping bug (injected)")
        return real()

    eng.scheduler.schedule = broken
    hs = [eng.submit(req("abc", max_new_tokens=4)) for _ in range(2)]
    eng.runner.gate.set()
    for h in hs:
        c = h.result()
        assert c.finish_reason == FinishReason.ERROR and "bookkeeping bug" in c.error
    assert eng.submit(req("abc", max_new_tokens=2)).result().token_ids == (3, 4)


def test_long_prompt_chunked_while_others_decode():
    eng = fake_engine(max_step_tokens=8, prefill_chunk_tokens=4)
    short = eng.submit(req("a", max_new_tokens=40, ignore_eos=True))
    next(iter(short))  # short is decoding
    long = eng.submit(req("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ", max_new_tokens=2))
    assert long.result().token_ids == (ALPHA.index("K"), ALPHA.index("L"))
    short.result()
    # every step that carried a prefill chunk of the long prompt also carried short's decode token
    long_slot_steps = [b for b in eng.runner.batches if any(len(c.token_ids) > 1 for c in b.chunks)]
    assert len(long_slot_steps) >= 36 // 4 - 1
    for b in eng.runner.batches:
        assert sum(len(c.token_ids) for c in b.chunks) <= 8
        assert all(len(c.token_ids) <= 4 for c in b.chunks)


def test_threads_and_stats():
    eng = fake_engine(slots=3)
    out = {}

    def client(i):
        time.sleep(random.random() * 0.02)
        out[i] = eng.submit(req([i + 2] * (i + 1), max_new_tokens=5 + i % 3, ignore_eos=True)).result()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, c in out.items():
        assert c.token_ids[0] == (i + 3) % V and c.generated_tokens == 5 + i % 3
    wait_idle(eng)
    s = eng.stats()
    assert s["requests_total"] == 12 and s["running"] == 0 and s["waiting"] == 0
    assert s["generated_tokens_total"] == sum(5 + i % 3 for i in range(12))
    assert s["prompt_tokens_total"] == sum(i + 1 for i in range(12))
    assert s["total_slots"] == 3 and s["free_slots"] == 3 and s["steps"] > 0
    assert s["finished_total"]["length"] == 12
    # DEVICE=cuda:N: the loop thread makes the runner's GPU its current device before any step
    assert eng.runner.bound_threads == ["engine-loop"]


def test_shutdown_drains_then_refuses():
    eng = fake_engine()
    h = eng.submit(req("a", max_new_tokens=30, ignore_eos=True))
    eng.shutdown(10)
    assert h.result().finish_reason == FinishReason.LENGTH
    assert not eng.ready
    with pytest.raises(EngineNotReady, match="shutting down"):
        eng.submit(req("a"))


def test_shutdown_timeout_ends_in_flight_with_error():
    eng = fake_engine(script={t: t for t in range(V)})
    eng.runner.gate = threading.Event()
    h = eng.submit(req("b", max_new_tokens=150))
    threading.Timer(0.3, eng.runner.gate.set).start()
    eng.shutdown(0.1)
    c = h.result()
    assert c.finish_reason == FinishReason.ERROR and "shut down" in c.error


# ---- the real runner + tokenizer on the tiny checkpoint (fp32, CPU) ---------------------------------


def hf_greedy(hf_model, prompt: list[int], max_new: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new)
    return out[0, len(prompt):].tolist()




def prompts(n: int, seed: int, lo: int = 1, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def test_real_greedy_matches_hf_single(tiny_ckpt, hf_model):
    eng = real_engine(tiny_ckpt)
    assert eng.ready and eng.tokenizer.eos_token_id == hf_model.generation_config.eos_token_id
    for p in prompts(4, seed=1):
        c = eng.submit(GenerationRequest(tuple(p), SamplingParams(max_new_tokens=12))).result()
        assert list(c.token_ids) == hf_greedy(hf_model, p, 12)
        assert c.text == eng.tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_real_continuous_batching_matches_hf(tiny_ckpt, hf_model):
    # 16 requests from threads at different times, 5 slots: they queue, join and leave running batches.
    ps = prompts(16, seed=2, hi=40)
    max_new = [3 + (i * 5) % 8 for i in range(16)]  # kept short: the 16 HF references dominate the time
    refs = [hf_greedy(hf_model, p, n) for p, n in zip(ps, max_new, strict=True)]
    eng = real_engine(tiny_ckpt, max_concurrent_seqs=5, max_step_tokens=40, prefill_chunk_tokens=16)
    results: dict[int, object] = {}
    rng = random.Random(3)
    delays = [rng.random() * 0.5 for _ in ps]

    def client(i):
        time.sleep(delays[i])
        results[i] = eng.submit(GenerationRequest(tuple(ps[i]), SamplingParams(max_new_tokens=max_new[i]))).result()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(16):
        assert list(results[i].token_ids) == refs[i], f"request {i}"
    assert eng.stats()["steps"] < sum(max_new)  # sequences really shared steps


def test_real_chunked_prefill_equals_unchunked(tiny_ckpt, hf_model):
    ps = prompts(3, seed=4, lo=20, hi=70)
    eng = real_engine(tiny_ckpt, prefill_chunk_tokens=3, max_step_tokens=7)
    for p in ps:
        c = eng.submit(GenerationRequest(tuple(p), SamplingParams(max_new_tokens=8))).result()
        assert list(c.token_ids) == hf_greedy(hf_model, p, 8)


def test_real_seed_reproducible_across_batch_mates(tiny_ckpt):
    eng = real_engine(tiny_ckpt)
    p = SamplingParams(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=50, seed=77)
    prompt = tuple(prompts(1, seed=5)[0])
    alone = eng.submit(GenerationRequest(prompt, p)).result()
    mates = [eng.submit(GenerationRequest(tuple(q), SamplingParams(max_new_tokens=20, do_sample=True)))
             for q in prompts(3, seed=6)]
    together = eng.submit(GenerationRequest(prompt, p)).result()
    for h in mates:
        h.result()
    assert alone.token_ids == together.token_ids and alone.seed == 77
    other = eng.submit(GenerationRequest(prompt, SamplingParams(**{**p.__dict__, "seed": 78}))).result()
    assert other.token_ids != alone.token_ids


def test_real_stop_string_and_stop_token(tiny_ckpt):
    eng = real_engine(tiny_ckpt)
    prompt = tuple(prompts(1, seed=7)[0])
    full = eng.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=24))).result()
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3
    c = eng.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=24, stop=(stop,)))).result()
    assert c.finish_reason == FinishReason.STOP
    assert c.text == text[: text.index(stop)] and stop not in c.text
    assert c.token_ids == full.token_ids[: len(c.token_ids)]
    tid = full.token_ids[5]
    c = eng.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=24, stop_token_ids=(tid,)))).result()
    assert c.finish_reason == FinishReason.STOP and c.token_ids == full.token_ids[: full.token_ids.index(tid) + 1]


def test_real_cancel_and_injected_failure_keep_serving(tiny_ckpt, hf_model):
    eng = real_engine(tiny_ckpt)
    p = prompts(2, seed=8)
    h = eng.submit(GenerationRequest(tuple(p[0]), SamplingParams(max_new_tokens=150, ignore_eos=True)))
    it = iter(h)
    next(it)
    h.cancel()
    assert list(it)[-1].finish_reason == FinishReason.CANCELLED

    real_forward = eng.runner.forward
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real_forward(batch)

    eng.runner.forward = flaky
    c = eng.submit(GenerationRequest(tuple(p[1]), SamplingParams(max_new_tokens=6))).result()
    assert c.finish_reason == FinishReason.ERROR and "out of memory" in c.error
    # the freed slot is reused from a fresh state: results are still exact
    c = eng.submit(GenerationRequest(tuple(p[1]), SamplingParams(max_new_tokens=6))).result()
    assert list(c.token_ids) == hf_greedy(hf_model, p[1], 6)


def test_real_logprobs_and_top_tokens_match_hf_scores(tiny_ckpt, hf_model):
    eng = real_engine(tiny_ckpt)
    p = prompts(1, seed=9)[0]
    c = eng.submit(GenerationRequest(tuple(p), SamplingParams(max_new_tokens=5, top_n_tokens=3))).result()
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=5, output_scores=True,
                                return_dict_in_generate=True)
    for i, scores in enumerate(out.scores):
        ref = torch.log_softmax(scores[0].float(), -1)
        tok = c.token_ids[i]
        assert abs(c.logprobs[i] - ref[tok].item()) < 1e-4
        top = c.top_tokens[i]
        assert [t.token_id for t in top] == torch.topk(ref, 3).indices.tolist()
        assert top[0].token_id == tok and top[0].text == eng.tokenizer.token_text(tok)
        assert all(abs(t.logprob - ref[t.token_id].item()) < 1e-4 for t in top)


def test_real_deferred_events_give_the_same_results(tiny_ckpt):
    # An asynchronous device: the engine makes a step's text and events after launching the next step.
    # Stop strings then end a sequence one step late (its extra token is dropped); every result must be
    # the same as with events made at once, and no slot may leak.
    ps = prompts(10, seed=12, hi=30)
    base = real_engine(tiny_ckpt, max_concurrent_seqs=4)
    free = [base.submit(GenerationRequest(tuple(p), SamplingParams(max_new_tokens=16))).result() for p in ps]
    params = []
    for i, c in enumerate(free):
        kw = dict(max_new_tokens=16 - i % 5)
        if i % 3 == 0 and len(c.text) > 6:
            kw["stop"] = (c.text[3:6],)
        if i % 3 == 1:
            kw["stop_token_ids"] = (c.token_ids[4],)
        if i % 4 == 2:
            kw.update(do_sample=True, temperature=1.2, top_k=40, seed=i)
        params.append(SamplingParams(**kw))
    results = []
    for asynchronous in (False, True):
        eng = real_engine(tiny_ckpt, max_concurrent_seqs=4)
        eng.runner.asynchronous = asynchronous
        hs = [eng.submit(GenerationRequest(tuple(p), q)) for p, q in zip(ps, params, strict=True)]
        results.append([(c.token_ids, c.text, c.finish_reason) for c in (h.result() for h in hs)])
        wait_idle(eng)
        st = eng.stats()
        assert st["free_slots"] == 4 and sum(st["finished_total"].values()) == len(ps)  # each ended once
        assert all(h._queue.empty() for h in hs)  # no event after the last one
    assert results[0] == results[1]
    assert {r[2] for r in results[0]} >= {FinishReason.STOP, FinishReason.LENGTH}


def test_failure_while_making_text_fails_only_that_sequence():
    eng = fake_engine(script={5: 40})  # "f" -> token 40, whose text the detokenizer cannot make
    real = FakeDetok.push

    def push(self, t):
        if t == 40:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return real(self, t)

    FakeDetok.push = push
    try:
        bad = eng.submit(req("f", max_new_tokens=4)).result()
        good = eng.submit(req("k", max_new_tokens=4)).result()
    finally:
        FakeDetok.push = real
    assert bad.finish_reason == FinishReason.ERROR and "injected" in bad.error
    assert good.token_ids == (11, 12, 13, 14) and good.finish_reason == FinishReason.LENGTH
