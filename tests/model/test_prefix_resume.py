"""Resume from prefix-cache snapshots on the real runner (tiny checkpoint, fp32, CPU): greedy tokens equal
Hugging Face generate on the full prompt, for a resume at the end of a prompt, at the end of a generation,
inside a KV block, on a block edge, across SSD chunk boundaries (tiny: 16-token chunks and 16-token KV
blocks), from the host tier; plus a soak under memory pressure that must leak nothing."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from model.types import FinishReason, GenerationRequest, SamplingParams
from tests.fakes import ENGINES, check_pools_and_shut_down, real_engine


def hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n)
    return out[0, len(prompt):].tolist()




@pytest.fixture(autouse=True)
def nothing_leaks():
    ENGINES.clear()
    yield
    check_pools_and_shut_down(ENGINES)


def gen(eng, ids, n, session=None):
    c = eng.submit(GenerationRequest(tuple(ids), SamplingParams(max_new_tokens=n, ignore_eos=True),
                                     session_id=session)).result()
    assert c.finish_reason == FinishReason.LENGTH, c.error
    return c


def ids(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


@pytest.mark.parametrize("plen", [37, 32, 45])  # mid-block + mid-chunk, block/chunk edge, mid-block
@pytest.mark.parametrize("tier", ["device", "host"])
def test_resume_from_end_of_prompt(tiny_ckpt, hf_model, plen, tier):
    eng = real_engine(tiny_ckpt, snapshot_device_share=0.25 if tier == "device" else 0.0)
    p = ids(plen, seed=plen)
    gen(eng, p, 4)
    st = eng.stats()["prefix_cache"]
    assert st[f"snapshots_{tier}"] == 2 and st["snapshots_" + ("host" if tier == "device" else "device")] == 0
    q = p + ids(30, seed=1)  # continues across the SSD chunk / KV block edges at 48 and 64
    before = eng.stats()["prefill_tokens_total"]
    c = gen(eng, q, 6)
    assert c.cached_tokens == plen
    assert eng.stats()["prefill_tokens_total"] - before == len(q) - plen  # only the new part was computed
    assert list(c.token_ids) == hf_greedy(hf_model, q, 6)


@pytest.mark.parametrize("tier", ["device", "host"])
def test_resume_from_end_of_generation(tiny_ckpt, hf_model, tier):
    eng = real_engine(tiny_ckpt, snapshot_device_share=0.25 if tier == "device" else 0.0, prefill_chunk_tokens=8)
    p = ids(21, seed=5)
    out = list(gen(eng, p, 9).token_ids)
    assert out == hf_greedy(hf_model, p, 9)
    q = p + out + ids(25, seed=6)  # the next turn: the whole previous answer, then new tokens
    c = gen(eng, q, 7)
    assert c.cached_tokens == len(p) + len(out) - 1  # the last output token never went through the network
    assert list(c.token_ids) == hf_greedy(hf_model, q, 7)
    pc = eng.stats()["prefix_cache"]
    assert pc["hits"] == 1 and pc["hits_host"] == (tier == "host")


def test_resume_feeding_one_token_and_exact_repeat(tiny_ckpt, hf_model):
    eng = real_engine(tiny_ckpt)
    p = ids(29, seed=7)
    first = list(gen(eng, p, 5).token_ids)
    c = gen(eng, p + [first[0]], 4)  # one new token: the resumed sequence runs as a decode step
    assert c.cached_tokens == len(p) and list(c.token_ids) == first[1:5]
    again = gen(eng, p, 5)  # the prompt equals a snapshot: no strict prefix is cached, so a full prefill
    assert again.cached_tokens == 0 and list(again.token_ids) == first
    assert first == hf_greedy(hf_model, p, 5)


def test_session_pins_its_conversation(tiny_ckpt, hf_model):
    eng = real_engine(tiny_ckpt, snapshot_device_share=0.0, snapshot_host_bytes=1)  # no room: only pins survive
    p = ids(19, seed=8)
    c1 = gen(eng, p, 6, session="s-1")
    conv = eng.session_conversation("s-1")
    assert conv == tuple(p) + c1.token_ids
    gen(eng, ids(40, seed=9), 3)  # unrelated traffic: its snapshots are dropped at once
    assert eng.stats()["prefix_cache"]["evictions"] >= 2
    q = list(conv) + ids(10, seed=10)
    c2 = gen(eng, q, 5, session="s-1")
    assert c2.cached_tokens == len(conv) - 1 and list(c2.token_ids) == hf_greedy(hf_model, q, 5)
    assert eng.session_conversation("s-1") == tuple(q) + c2.token_ids
    assert eng.stats()["prefix_cache"]["sessions"] == 1
    assert eng.release_session("s-1") and eng.session_conversation("s-1") is None
    assert not eng.release_session("s-1")


def test_soak_under_pressure_matches_no_cache(tiny_ckpt):
    # 10 conversations x 4 turns over 3 slots and a KV pool that cannot hold them all: snapshots are moved
    # and evicted, nothing is refused, every answer equals the engine without a prefix cache.
    cfg = dict(max_concurrent_seqs=3, kv_cache_tokens=640, snapshot_device_share=0.5,
               snapshot_host_bytes=600_000)
    on, off = real_engine(tiny_ckpt, **cfg), real_engine(tiny_ckpt, prefix_cache=False, **cfg)
    assert off.prefix is None
    results: dict[tuple, list] = {}

    def conversation(i):
        hist = ids(8 + i, seed=100 + i)
        for turn in range(4):
            prompt = hist + ids(12, seed=1000 * i + turn)
            a = gen(on, prompt, 5)
            b = gen(off, prompt, 5)
            results[(i, turn)] = [a.token_ids, b.token_ids]
            hist = prompt + list(a.token_ids)

    threads = [threading.Thread(target=conversation, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 40
    for key, (a, b) in results.items():
        assert a == b, key
    st = on.stats()
    pc = st["prefix_cache"]
    assert pc["hits"] >= 10 and pc["demotions"] > 0 and pc["evictions"] > 0
    print(pc)
    assert pc["bytes_host"] <= 600_000
    assert st["finished_total"]["error"] == 0
    assert st["prefill_tokens_total"] < off.stats()["prefill_tokens_total"]


def test_snapshots_never_block_admission(tiny_ckpt):
    # A 256-token KV pool: three finished prompts leave their snapshots holding most of it; a request that
    # needs the whole pool is admitted at once by taking their blocks (host tier off: they are dropped).
    eng = real_engine(tiny_ckpt, kv_cache_tokens=256, max_total_tokens=256, snapshot_device_share=1.0,
                 snapshot_host_bytes=0)
    for s in range(3):
        gen(eng, ids(60, seed=20 + s), 4)
    assert eng.runner.allocator.num_free_blocks < 15  # not enough without taking snapshot blocks
    c = gen(eng, ids(200, seed=30), 40)
    assert len(c.token_ids) == 40
    pc = eng.stats()["prefix_cache"]
    assert pc["evictions"] >= 3 and pc["snapshots_host"] == 0


def test_stop_string_found_while_the_next_step_runs_snapshots_after_it(tiny_ckpt, hf_model):
    """An asynchronous device: a stop string is found while the sequence's next step is already launched,
    and that step moves its state once more. The session's snapshot is taken after that step is collected
    (prompt + every output token), so the next turn resumes from the whole conversation and stays exact."""
    eng = real_engine(tiny_ckpt)
    eng.runner.asynchronous = True  # events made after the next launch, as on CUDA
    p = ids(23, seed=12)
    free = eng.submit(GenerationRequest(tuple(p), SamplingParams(max_new_tokens=12, ignore_eos=True))).result()
    cut = next(i for i in range(3, len(free.token_ids)) if len(eng.tokenizer.decode(list(free.token_ids[:i]))) > 2)
    stop = eng.tokenizer.decode(list(free.token_ids[:cut]))[-2:]
    c1 = eng.submit(GenerationRequest(tuple(p), SamplingParams(max_new_tokens=12, ignore_eos=True, stop=(stop,)),
                                      session_id="s-2")).result()
    assert c1.finish_reason == FinishReason.STOP and len(c1.token_ids) < len(free.token_ids)
    conv = eng.session_conversation("s-2")
    assert conv == tuple(p) + c1.token_ids
    q = list(conv) + ids(9, seed=13)
    c2 = gen(eng, q, 5)
    assert c2.cached_tokens == len(conv)  # the extra step fed the last output token: the whole conversation
    assert list(c2.token_ids) == hf_greedy(hf_model, q, 5)
    assert eng.release_session("s-2")
