"""The batched sampler (model/runtime/sampling.py) against the sampler it replaced (tests/model/sampling_oracle.py):
the same tokens, logprobs and alternatives for the same seeds, over mixed batches and many steps."""

from __future__ import annotations

import random

import torch

from model.runtime.sampling import Sampler
from model.types import SamplingParams
from tests.model.sampling_oracle import RowState, sample

V = 97

MIX = [
    SamplingParams(),
    SamplingParams(top_n_tokens=3),
    SamplingParams(repetition_penalty=1.4),
    SamplingParams(frequency_penalty=0.6, presence_penalty=0.3, top_n_tokens=2),
    SamplingParams(do_sample=True, seed=1),
    SamplingParams(do_sample=True, temperature=0.7, top_k=9, seed=2),
    SamplingParams(do_sample=True, top_p=0.85, seed=3, top_n_tokens=4),
    SamplingParams(do_sample=True, typical_p=0.7, seed=4),
    SamplingParams(do_sample=True, temperature=1.3, top_k=30, top_p=0.9, typical_p=0.95,
                   repetition_penalty=1.2, frequency_penalty=0.2, seed=5),
    SamplingParams(do_sample=True, temperature=0.0, seed=6),  # temperature 0: greedy
    SamplingParams(do_sample=True, temperature=2.0, presence_penalty=1.0, seed=7, top_n_tokens=1),
]


def test_same_tokens_as_the_old_sampler_over_mixed_batches():
    rng = random.Random(0)
    num_slots = 16
    slots = rng.sample(range(num_slots), len(MIX))  # rows live in scattered slots, in no particular order
    prompts = [tuple(rng.randrange(V) for _ in range(rng.randint(1, 12))) for _ in MIX]
    new = Sampler(num_slots, V, "cpu")
    for s, p, pr in zip(slots, MIX, prompts, strict=True):
        new.open(s, p, p.seed, pr)
    old = [RowState(p, pr) for p, pr in zip(MIX, prompts, strict=True)]
    outputs: list[list[int]] = [[] for _ in MIX]
    g = torch.Generator().manual_seed(1)
    for step in range(25):
        x = torch.randn(len(MIX), V, generator=g) * 3
        # a varying subset each step (sequences join and leave), rows in a shuffled order
        rows = sorted(rng.sample(range(len(MIX)), rng.randint(1, len(MIX))), key=lambda _: rng.random())
        ref = sample(x[rows], [old[i] for i in rows], [outputs[i] for i in rows])
        got = new.sample_to_host(x[rows], [slots[i] for i in rows])
        assert got.token_ids == ref.token_ids, step
        assert got.logprobs == ref.logprobs, step
        assert got.top == ref.top, step
        for i, t in zip(rows, got.token_ids, strict=True):
            outputs[i].append(t)
    assert any(len(set(o)) > 3 for o in outputs)  # sampled rows really sampled


def test_reopened_slot_starts_clean():
    # A slot reused by a new sequence: no penalty history or generator state carries over.
    p = SamplingParams(do_sample=True, repetition_penalty=1.5, frequency_penalty=1.0, seed=11)
    x = torch.randn(6, V, generator=torch.Generator().manual_seed(2)) * 3
    s = Sampler(2, V, "cpu")
    s.open(1, SamplingParams(do_sample=True, seed=3, presence_penalty=2.0), 3, (1, 2))
    for i in range(3):
        s.sample(x[i:i + 1], [1])
    s.open(1, p, p.seed, (4,))
    got = [s.sample_to_host(x[i:i + 1], [1]).token_ids[0] for i in range(3, 6)]
    fresh = Sampler(2, V, "cpu")
    fresh.open(1, p, p.seed, (4,))
    assert got == [fresh.sample_to_host(x[i:i + 1], [1]).token_ids[0] for i in range(3, 6)]
