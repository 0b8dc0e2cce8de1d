"""Prefill attention holds no (queries x keys) temporary, and what it holds is what the memory budget counts.

Measured with torch's profiler (bench/prefill_memory.py alloc_profile: every CPU allocation during the call).
The old path built a (1, 1, L, Tk) bool mask, tiled it over the query heads of each KV group and SDPA made a
float copy: its peak grew with L x Tk (bool + rep x bool + rep x 4 bytes per query-key pair), which an L x Tk
mixed difference of the peaks isolates from the terms linear in L (activations) and in Tk (gathered K / V).
"""

from __future__ import annotations

import pytest
import torch

from bench.prefill_memory import MICRO_ATTN, alloc_profile, attention_case, chunk, load
from model.network.kernels import Kernels
from model.runtime.state import prefill_attention_bytes

LS, TKS = (32, 512), (1024, 8192)  # chunk lengths and contexts (keys); queries at [Tk - L, Tk)


@pytest.fixture(scope="module")
def peaks(tiny_ckpt):
    model, pool = load(tiny_ckpt, max(TKS))
    out = {}
    for L in LS:
        for tk in TKS:
            fn = chunk(model, pool, L, tk)
            fn()  # warm (first-call allocations)
            out[L, tk] = alloc_profile(fn)
    return out


def test_prefill_chunk_peak_has_no_queries_by_keys_term(peaks):
    (l1, l2), (t1, t2) = LS, TKS
    mixed = peaks[l2, t2][0] - peaks[l2, t1][0] - peaks[l1, t2][0] + peaks[l1, t1][0]
    # less than one byte per (query, key) pair: not even a bool (L, Tk) mask (the old path: 11 here)
    assert mixed < (l2 - l1) * (t2 - t1), {k: v[0] for k, v in peaks.items()}


def test_largest_allocation_is_the_chunks_or_the_contexts(peaks):
    """The long chunk at the long context allocates nothing larger than the long chunk at the short context
    or the short chunk at the long context do (activations ~ L, gathered K / V ~ Tk); a mask ~ L x Tk would."""
    (l1, l2), (t1, t2) = LS, TKS
    largest = {k: v[1] for k, v in peaks.items()}
    assert largest[l2, t2] <= max(largest[l1, t2], largest[l2, t1]), largest


@pytest.mark.parametrize("starts,lengths", [([0], [512]), ([3584], [512]), ([0, 0, 0], [200, 64, 9]),
                                            ([0, 1500, 0, 700, 700], [128, 100, 37, 256, 3])])
def test_attention_temporaries_within_the_budget(starts, lengths):
    """The measured CPU peak of one prefill attention call stays within prefill_attention_bytes, the term the
    CUDA memory budget keeps back for it (model/runtime/state.py), at the micro's head counts."""
    a = MICRO_ATTN
    q, k_cache, v_cache, pk, tk = attention_case(starts, lengths)
    K = Kernels("auto", "cpu")
    K.prefill_attention(q, k_cache, v_cache, pk, a.attention_multiplier)  # warm
    peak, _ = alloc_profile(lambda: K.prefill_attention(q, k_cache, v_cache, pk, a.attention_multiplier))
    budget = prefill_attention_bytes(a, sum(lengths), len(starts), tk, max(lengths), torch.float32,
                                     expand_heads=False)
    assert peak <= budget, (peak, budget)
