"""Resume from a snapshot taken at a boundary inside a prompt, on the real runner (tiny checkpoint, fp32, CPU):
greedy tokens equal Hugging Face generate on the full prompt; only the tokens past the boundary are computed.
Structural boundaries (a shared system part, GenerationRequest.snapshot_at) and the interval policy of raw
prompts, from the device and the host tier."""

from __future__ import annotations

import pytest

from model.types import FinishReason, GenerationRequest, SamplingParams
from tests.fakes import ENGINES, check_pools_and_shut_down, real_engine
from tests.model.test_prefix_resume import hf_greedy, ids


@pytest.fixture(autouse=True)
def nothing_leaks():
    ENGINES.clear()
    yield
    check_pools_and_shut_down(ENGINES)


def gen(eng, prompt, n, snapshot_at=None):
    c = eng.submit(GenerationRequest(tuple(prompt), SamplingParams(max_new_tokens=n, ignore_eos=True),
                                     snapshot_at=snapshot_at)).result()
    assert c.finish_reason == FinishReason.LENGTH, c.error
    return c


@pytest.mark.parametrize("tier", ["device", "host"])
@pytest.mark.parametrize("sys_len", [45, 48])  # mid-block + mid-SSD-chunk; on the block and chunk edge
def test_shared_system_part_resumes_at_the_exact_token(tiny_ckpt, hf_model, tier, sys_len):  # noqa: F811
    eng = real_engine(tiny_ckpt, snapshot_device_share=0.25 if tier == "device" else 0.0,
                      snapshot_boundary_tokens=16)
    system = ids(sys_len, seed=sys_len)
    a = system + ids(20, seed=1)
    assert list(gen(eng, a, 4, snapshot_at=(sys_len,)).token_ids) == hf_greedy(hf_model, a, 4)
    assert eng.stats()["prefix_cache"]["snapshots_boundary"] == 1
    b = system + ids(23, seed=2)  # the same system part, another question
    before = eng.stats()["prefill_tokens_total"]
    c = gen(eng, b, 6, snapshot_at=(sys_len,))
    assert c.cached_tokens == sys_len
    assert eng.stats()["prefill_tokens_total"] - before == len(b) - sys_len
    assert list(c.token_ids) == hf_greedy(hf_model, b, 6)
    assert eng.stats()["prefix_cache"]["hits_host"] == (tier == "host")


def test_raw_prompts_resume_from_an_interval_snapshot(tiny_ckpt, hf_model):  # noqa: F811
    eng = real_engine(tiny_ckpt, snapshot_interval_tokens=24)
    shared = ids(60, seed=7)
    prompts = [shared + ids(15, seed=10 + i) for i in range(3)]
    outs = [gen(eng, p, 5) for p in prompts]
    # first sight: nothing; second: snapshots at 24 and 48 (no reuse yet); third: resumes at 48
    assert [c.cached_tokens for c in outs] == [0, 0, 48]
    assert eng.stats()["prefix_cache"]["snapshots_boundary"] == 2
    for p, c in zip(prompts, outs, strict=True):
        assert list(c.token_ids) == hf_greedy(hf_model, p, 5)
