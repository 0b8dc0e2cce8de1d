from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from model.runtime.sampling import Sampler
from model.types import SamplingParams, StepOutput, resolve_seed

V = 50


def logits(b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, V, generator=g) * 3


def rows_for(params: list[SamplingParams], prompts=None, outputs=None) -> Sampler:
    """A sampler with slot i opened for params[i] (prompt prompts[i]) that has generated outputs[i]."""
    prompts = prompts or [(1, 2, 3)] * len(params)
    s = Sampler(len(params), V, "cpu")
    for i, (p, pr) in enumerate(zip(params, prompts, strict=True)):
        s.open(i, p, resolve_seed(p), pr)
    for i, out in enumerate(outputs or []):
        for t in out:
            s.record(torch.tensor([i]), torch.tensor([t]))
    return s


def sample(x: torch.Tensor, s: Sampler) -> StepOutput:
    return s.sample_to_host(x, list(range(x.shape[0])))


def process_logits(x: torch.Tensor, s: Sampler):
    return s.process(x, list(range(x.shape[0])))


def test_greedy_is_argmax_and_logprob_is_log_softmax():
    x = logits(6)
    out = sample(x, rows_for([SamplingParams()] * 6))
    assert out.token_ids == x.argmax(-1).tolist()
    expected = torch.log_softmax(x, -1).max(-1).values
    assert torch.allclose(torch.tensor(out.logprobs), expected, atol=1e-6)
    assert out.top == [[]] * 6


def test_input_logits_not_modified():
    x = logits(3)
    before = x.clone()
    p = SamplingParams(do_sample=True, top_k=3, repetition_penalty=1.5, frequency_penalty=0.5, seed=1)
    params = [p] * 3
    sample(x, rows_for(params, outputs=[[4, 4]] * 3))
    assert torch.equal(x, before)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_only_picks_allowed(k):
    x = logits(1, seed=k)
    allowed = set(torch.topk(x[0], k).indices.tolist())
    row = rows_for([SamplingParams(do_sample=True, top_k=k, temperature=5.0, seed=3)])
    picked = {sample(x, row).token_ids[0] for _ in range(200)}
    assert picked <= allowed
    assert len(picked) == k  # high temperature: every allowed token shows up in 200 draws


def test_top_p_only_picks_nucleus():
    x = logits(1, seed=5) / 3  # flat enough that the nucleus holds several tokens
    probs = x[0].softmax(-1)
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    n = int((cum < 0.6).sum()) + 1  # smallest set reaching mass 0.6
    allowed = set(order[:n].tolist())
    row = rows_for([SamplingParams(do_sample=True, top_p=0.6, seed=4)])
    picked = {sample(x, row).token_ids[0] for _ in range(300)}
    assert picked <= allowed and len(picked) > 1


def test_sampling_follows_distribution():
    x = torch.tensor([[0.0, math.log(3.0), -1e9, -1e9] + [-1e9] * (V - 4)])
    row = rows_for([SamplingParams(do_sample=True, seed=11)])
    draws = [sample(x, row).token_ids[0] for _ in range(2000)]
    assert set(draws) <= {0, 1}
    assert 0.70 < draws.count(1) / 2000 < 0.80  # p = 0.75; 5 sigma is ~0.05


def test_seed_reproducible_regardless_of_batch_mates():
    p = SamplingParams(do_sample=True, temperature=1.3, top_k=20, top_p=0.9, seed=1234)
    alone = rows_for([p])
    seq_alone = [sample(logits(1, seed=s), alone).token_ids[0] for s in range(30)]

    mates = [SamplingParams(do_sample=True, seed=9), SamplingParams(), SamplingParams(do_sample=True)]
    batch = rows_for([mates[0], mates[1], p, mates[2]])
    seq_batch = []
    for s in range(30):
        x = torch.cat([logits(2, seed=100 + s), logits(1, seed=s), logits(1, seed=200 + s)])
        seq_batch.append(sample(x, batch).token_ids[2])
    assert seq_batch == seq_alone
    other = rows_for([SamplingParams(do_sample=True, temperature=1.3, top_k=20, top_p=0.9, seed=99)])
    assert [sample(logits(1, seed=s), other).token_ids[0] for s in range(30)] != seq_alone


def test_unseeded_sampling_gets_reported_seed():
    seed = resolve_seed(SamplingParams(do_sample=True))
    assert isinstance(seed, int) and seed != resolve_seed(SamplingParams(do_sample=True))
    r = Sampler(1, V, "cpu")
    r.open(0, SamplingParams(do_sample=True), seed, (1,))
    again = rows_for([SamplingParams(do_sample=True, seed=seed)])
    xs = [logits(1, seed=s) for s in range(10)]
    assert [sample(x, r).token_ids for x in xs] == [sample(x, again).token_ids for x in xs]
    assert resolve_seed(SamplingParams()) is None


def test_frequency_presence_penalty_formula():
    x = logits(2)
    gen = [[5, 5, 7], []]
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    out, _ = process_logits(x, rows_for([p, p], outputs=gen))
    expected = x.clone()
    expected[0, 5] -= 2 * 0.5 + 0.25
    expected[0, 7] -= 1 * 0.5 + 0.25
    assert torch.allclose(out, expected)
    # prompt ids do not count for OpenAI penalties
    out2, _ = process_logits(x[:1], rows_for([p], [(5, 6)]))
    assert torch.equal(out2, x[:1])


def test_penalties_change_greedy_choice():
    x = torch.zeros(1, V)
    x[0, 3] = 2.0
    x[0, 4] = 1.5
    assert sample(x, rows_for([SamplingParams()], outputs=[[3]])).token_ids == [3]
    assert sample(x, rows_for([SamplingParams(repetition_penalty=2.0)], outputs=[[3]])).token_ids == [4]
    assert sample(x, rows_for([SamplingParams(frequency_penalty=1.0)], outputs=[[3]])).token_ids == [4]
    # repetition penalty also covers the prompt
    assert sample(x, rows_for([SamplingParams(repetition_penalty=2.0)], [(3,)])).token_ids == [4]


def _hf_chain(p: SamplingParams):
    chain = []
    if p.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if not p.greedy:
        if p.temperature != 1.0:
            chain.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k > 0:
            chain.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            chain.append(TopPLogitsWarper(p.top_p))
        if p.typical_p < 1.0:
            chain.append(TypicalLogitsWarper(p.typical_p))
    return chain


HF_CASES = [
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(repetition_penalty=0.7),
    SamplingParams(do_sample=True, top_k=7),
    SamplingParams(do_sample=True, top_p=0.8),
    SamplingParams(do_sample=True, typical_p=0.6),
    SamplingParams(do_sample=True, temperature=0.7, top_k=12, top_p=0.9, typical_p=0.95,
                   repetition_penalty=1.2),
    SamplingParams(do_sample=True, temperature=2.0, top_p=0.3),
    SamplingParams(),
]


def test_hf_logits_processor_equivalence_mixed_batch():
    # All cases in ONE batch: each row must match HF's processors applied to that row alone.
    B = len(HF_CASES)
    x = logits(B, seed=42)
    prompts = [tuple(range(i, i + 6)) for i in range(B)]
    gens = [[i + 10, i + 11, i + 10] for i in range(B)]
    out, sampled = process_logits(x, rows_for(HF_CASES, prompts, outputs=gens))
    assert sampled == [i for i, p in enumerate(HF_CASES) if not p.greedy]
    for i, p in enumerate(HF_CASES):
        ids = torch.tensor([list(prompts[i]) + gens[i]])
        ref = x[i : i + 1].clone()
        for proc in _hf_chain(p):
            ref = proc(ids, ref)
        assert torch.equal(torch.isinf(out[i]), torch.isinf(ref[0])), p
        finite = ~torch.isinf(ref[0])
        assert torch.allclose(out[i][finite], ref[0][finite], atol=1e-6), p


def test_logprob_is_of_processed_distribution_and_top_n():
    x = logits(2, seed=8)
    p = SamplingParams(do_sample=True, top_k=3, temperature=0.5, seed=2, top_n_tokens=5)
    out = sample(x, rows_for([p, SamplingParams(top_n_tokens=2)]))
    proc = torch.log_softmax(TopKLogitsWarper(3)(None, x[:1] / 0.5), -1)[0]
    assert math.isclose(out.logprobs[0], proc[out.token_ids[0]].item(), rel_tol=1e-5)
    # only 3 tokens survive top-k, so at most 3 alternatives, best first, all finite
    assert [t for t, _ in out.top[0]] == torch.topk(x[0], 3).indices.tolist()
    assert math.isclose(sum(math.exp(v) for _, v in out.top[0]), 1.0, rel_tol=1e-5)
    lp1 = torch.log_softmax(x[1], -1)
    assert [t for t, _ in out.top[1]] == torch.topk(lp1, 2).indices.tolist()
    assert out.top[1][0][0] == out.token_ids[1]


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError):
        rows_for([SamplingParams()]).sample(logits(2), [0])
