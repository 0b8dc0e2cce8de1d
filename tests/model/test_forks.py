"""Forks on the real runner (tiny checkpoint, fp32, CPU; model/engine/forks.py): one prefill, n rows from copies
of the prompt's state. Each greedy row equals Hugging Face generate on the full prompt; seeded sampled rows are
reproducible, differ from each other and equal a lone request with the row's seed; the prompt is prefilled
once (prompt_len - 1 + n tokens computed); cancelling one row leaves the others; nothing leaks."""

from __future__ import annotations

import dataclasses

import pytest

from model.types import FinishReason, GenerationRequest, InvalidRequest, SamplingParams
from tests.fakes import ENGINES, check_pools_and_shut_down, real_engine
from tests.model.test_prefix_resume import gen, hf_greedy, ids


@pytest.fixture(autouse=True)
def nothing_leaks():
    ENGINES.clear()
    yield
    check_pools_and_shut_down(ENGINES)  # every slot and KV block back, snapshots dropped


def greedy(n_new, **kw):
    return SamplingParams(max_new_tokens=n_new, ignore_eos=True, **kw)


def rows(eng, prompt, n, params):
    cs = [h.result() for h in eng.submit_n(GenerationRequest(tuple(prompt), params), n)]
    assert all(c.finish_reason == FinishReason.LENGTH for c in cs), [c.error for c in cs]
    return [list(c.token_ids) for c in cs]


@pytest.mark.parametrize("plen", [37, 33, 1])  # partial last block at the fork point, a block edge, no state
def test_greedy_rows_equal_a_full_prefill(tiny_ckpt, hf_model, plen):
    eng = real_engine(tiny_ckpt, prefix_cache=False)
    p = ids(plen, seed=plen)
    before = eng.stats()["prefill_tokens_total"]
    out = rows(eng, p, 4, greedy(7))
    assert eng.stats()["prefill_tokens_total"] - before == plen - 1 + 4  # the prompt once, its last token per row
    want = hf_greedy(hf_model, p, 7)
    assert out == [want] * 4


def test_sampled_rows_reproducible_distinct_and_seeded_per_row(tiny_ckpt):
    eng = real_engine(tiny_ckpt, prefix_cache=False)
    p = ids(29, seed=3)
    params = SamplingParams(max_new_tokens=8, do_sample=True, temperature=1.5, seed=1234, ignore_eos=True)
    first, again = rows(eng, p, 4, params), rows(eng, p, 4, params)
    assert first == again
    assert len({tuple(r) for r in first}) == 4, first  # each row has its own seed stream
    for i in (0, 3):  # row i samples as a lone request with seed + i would, from a state that is the same
        lone = gen_sampled(eng, p, dataclasses.replace(params, seed=1234 + i))
        assert lone == first[i]


def gen_sampled(eng, prompt, params):
    c = eng.submit(GenerationRequest(tuple(prompt), params)).result()
    assert c.finish_reason == FinishReason.LENGTH, c.error
    return list(c.token_ids)


def test_rows_share_steps_with_other_requests(tiny_ckpt, hf_model):
    eng = real_engine(tiny_ckpt, max_concurrent_seqs=6, prefix_cache=False)
    p, q, r = ids(45, seed=11), ids(20, seed=12), ids(9, seed=13)
    hq = eng.submit(GenerationRequest(tuple(q), greedy(9)))
    hs = eng.submit_n(GenerationRequest(tuple(p), greedy(6)), 3)
    hr = eng.submit(GenerationRequest(tuple(r), greedy(5)))
    assert [list(h.result().token_ids) for h in hs] == [hf_greedy(hf_model, p, 6)] * 3
    assert list(hq.result().token_ids) == hf_greedy(hf_model, q, 9)
    assert list(hr.result().token_ids) == hf_greedy(hf_model, r, 5)


def test_fork_from_a_snapshot_at_the_fork_point_prefills_only_the_last_tokens(tiny_ckpt, hf_model):
    eng = real_engine(tiny_ckpt)  # prefix cache on
    p = ids(40, seed=21)
    gen(eng, p[:-1], 2)  # leaves a snapshot of p[:-1]: p's fork point
    before = eng.stats()["prefill_tokens_total"]
    hs = eng.submit_n(GenerationRequest(tuple(p), greedy(5)), 3)
    cs = [h.result() for h in hs]
    assert eng.stats()["prefill_tokens_total"] - before == 3  # only each row's last prompt token
    assert [c.cached_tokens for c in cs] == [len(p) - 1] * 3
    assert [list(c.token_ids) for c in cs] == [hf_greedy(hf_model, p, 5)] * 3


def test_the_same_fork_request_again_resumes_at_the_fork_point(tiny_ckpt, hf_model):
    eng = real_engine(tiny_ckpt)  # prefix cache on
    p = ids(50, seed=22)
    first = rows(eng, p, 3, greedy(4))
    st = eng.stats()
    assert st["prefix_cache"]["snapshots_taken"] == 2  # the fork point, the rows' (equal, greedy) end; no prompt end
    again = eng.submit_n(GenerationRequest(tuple(p), greedy(4)), 3)
    cs = [h.result() for h in again]
    assert eng.stats()["prefill_tokens_total"] - st["prefill_tokens_total"] == 3
    assert [c.cached_tokens for c in cs] == [len(p) - 1] * 3
    assert [list(c.token_ids) for c in cs] == first == [hf_greedy(hf_model, p, 4)] * 3


def test_cancel_one_row_the_others_finish(tiny_ckpt, hf_model):
    eng = real_engine(tiny_ckpt, prefix_cache=False)
    p = ids(30, seed=31)
    hs = eng.submit_n(GenerationRequest(tuple(p), greedy(12)), 3)
    hs[1].cancel()  # before its fork: it never runs; the leader still prefills for the others
    next(iter(hs[0]))
    hs[2].cancel()  # a running row
    want = hf_greedy(hf_model, p, 12)
    assert list(hs[0].result().token_ids) == want
    assert hs[1].result().finish_reason == FinishReason.CANCELLED
    assert hs[2].result().finish_reason == FinishReason.CANCELLED
    assert list(hs[2].result().token_ids) == want[:len(hs[2].result().token_ids)]


def test_cancel_the_leader_before_the_fork_and_cancel_all(tiny_ckpt, hf_model):
    eng = real_engine(tiny_ckpt, prefix_cache=False, prefill_chunk_tokens=8, max_step_tokens=8)
    p = ids(60, seed=41)  # 8 prefill steps: the leader is cancelled while it prefills
    hs = eng.submit_n(GenerationRequest(tuple(p), greedy(5)), 2)
    hs[0].cancel()
    assert hs[0].result().finish_reason == FinishReason.CANCELLED
    assert list(hs[1].result().token_ids) == hf_greedy(hf_model, p, 5)
    hs = eng.submit_n(GenerationRequest(tuple(p), greedy(50)), 3)
    for h in hs:
        h.cancel()
    assert {h.result().finish_reason for h in hs} == {FinishReason.CANCELLED}


def test_admission_bounded_and_waits_for_room(tiny_ckpt, hf_model):
    eng = real_engine(tiny_ckpt, prefix_cache=False, max_concurrent_seqs=3)
    with pytest.raises(InvalidRequest) as e:
        eng.submit_n(GenerationRequest(tuple(ids(5, seed=1)), greedy(3)), 4)
    assert e.value.status == 422 and "n=4" in e.value.message
    long = eng.submit(GenerationRequest(tuple(ids(10, seed=2)), greedy(40)))  # holds one of the 3 slots
    p = ids(12, seed=3)
    hs = eng.submit_n(GenerationRequest(tuple(p), greedy(4)), 3)  # needs all 3 slots: waits for `long`
    cs = [h.result() for h in hs]
    assert long.result().finish_reason == FinishReason.LENGTH
    assert [list(c.token_ids) for c in cs] == [hf_greedy(hf_model, p, 4)] * 3


def test_soak_forks_with_snapshots_under_pressure(tiny_ckpt, hf_model):
    # fork groups and single requests over 3 slots and a KV pool that cannot hold them all plus the snapshots:
    # prompts share prefixes (resumes, some at a fork point), snapshots are demoted and dropped to admit groups;
    # every row equals HF greedy, and nothing leaks (the fixture).
    eng = real_engine(tiny_ckpt, max_concurrent_seqs=3, kv_cache_tokens=512, snapshot_device_share=0.5,
                      snapshot_host_bytes=400_000)
    base = ids(30, seed=50)
    jobs = []
    for i in range(8):
        p = base[: 20 + 3 * i] + ids(i % 3 * 7, seed=60 + i)
        n = 1 + i % 3
        jobs.append((p, eng.submit_n(GenerationRequest(tuple(p), greedy(6)), n)))
    for p, hs in jobs:
        want = hf_greedy(hf_model, p, 6)
        assert [list(h.result().token_ids) for h in hs] == [want] * len(hs)
    pc = eng.stats()["prefix_cache"]
    assert pc["hits"] > 0 and pc["demotions"] + pc["evictions"] > 0
