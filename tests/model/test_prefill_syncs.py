"""Host syncs per prefill forward (bench/host_syncs.py): the counter itself, and zero on the reference path.

The fused path (real kernels, Triton's interpreter) is counted in tests/triton/test_model_interp.py.
"""

from __future__ import annotations

import torch

from bench.host_syncs import count_syncs, exempt
from model.runtime.runner import ModelRunner
from model.types import EngineConfig, SeqChunk, StepBatch


def test_counter_sees_each_kind_of_read_back():
    t = torch.arange(6)
    with count_syncs() as s:
        t.tolist()
        t[0].item()
        bool(t[1])
        t.nonzero()
        t.repeat_interleave(t)
        t.repeat_interleave(t, output_size=15)  # the output size is given: no read back
        t + 1
        exempt(lambda: t.tolist())()
    assert dict(s.by_kind) == {"tolist": 1, "_local_scalar_dense": 2, "nonzero": 1, "repeat_interleave": 1}
    assert s.count == 5
    assert t.tolist() == list(range(6))  # methods restored


def test_reference_prefill_forward_has_no_host_sync(tiny_ckpt):
    """Fresh and continued chunks of uneven lengths in one packed step: nothing in the forward reads a tensor
    back (the runner returns logits; sampling, outside the forward, is the step's one read)."""
    r = ModelRunner(tiny_ckpt, EngineConfig(max_concurrent_seqs=4, max_input_tokens=64, max_total_tokens=96,
                                            kv_cache_tokens=512, device="cpu"))
    slots = [r.allocator.allocate(64) for _ in range(3)]
    r.forward(StepBatch((SeqChunk.fresh(slots[1], tuple(range(3, 20)), False),)))
    batch = StepBatch((SeqChunk.fresh(slots[0], tuple(range(30, 35)), True),
                       SeqChunk.cont(slots[1], tuple(range(20, 58)), 17, True),
                       SeqChunk.fresh(slots[2], tuple(range(60, 83)), True)))
    with count_syncs() as s:
        logits = r.forward(batch)
    assert logits.shape == (3, r.vocab_size)
    assert s.count == 0, s.by_kind
