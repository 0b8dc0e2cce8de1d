"""The whole network on the fused path, every Triton kernel real (SSD scan, selective_state_update, the
residual+RMSNorm, gated RMSNorm, SwiGLU, paged decode attention) under the interpreter, against the
reference path: the same greedy tokens, logits within fp32 rounding. causal-conv1d is CUDA C++: its
ops stay on the reference here (tests/gpu covers them)."""

from __future__ import annotations

import pytest
import torch

from model.network.fused_ops import FusedOps
from model.network.kernels import Kernels
from model.runtime.runner import ModelRunner
from model.types import EngineConfig, SeqChunk, StepBatch
from tests.tiny_granite import build_tiny

TRITON_OPS = ("ssd_prefill", "ssm_decode", "add_norm", "gated_norm", "swiglu", "decode_attention")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_fused_interp")
    build_tiny(d, seed=2)
    return d


def _greedy(runner, prompts, new):
    slots = [runner.allocator.allocate(len(p) + new) for p in prompts]
    out = runner.forward(StepBatch(tuple(SeqChunk.fresh(s, tuple(p), True) for s, p in zip(slots, prompts,
                                                                                         strict=True))))
    toks, rows = [[int(t)] for t in out.argmax(-1)], [out]
    for i in range(new - 1):
        out = runner.forward(StepBatch(tuple(SeqChunk.decode(s, t[-1], len(p) + i)
                                             for s, p, t in zip(slots, prompts, toks, strict=True))))
        rows.append(out)
        for t, row in zip(toks, out, strict=True):
            t.append(int(row.argmax()))
    return toks, torch.cat(rows)


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_fused_path_equals_reference(ckpt, mamba_ops, mode):
    """Prompts of 12, 17 and 30 tokens, 6 decode steps: rows cross KV block boundaries (16, 32) at different
    steps; eager decode passes the consecutive slots as a slice, static decode pads the batch of 3 to 4
    with the dummy slot and dummy block tables."""
    cfg = EngineConfig(max_concurrent_seqs=4, max_input_tokens=48, max_total_tokens=64, kv_cache_tokens=512,
                       dtype="float32")
    prompts = [list(range(3, 15)), list(range(40, 57)), [7, 1, 9] * 10]
    ref = ModelRunner(ckpt, cfg, decode_mode=mode)
    fused = ModelRunner(ckpt, cfg, decode_mode=mode)
    fused.kernels = Kernels("auto", "cpu", fused=FusedOps(**{f: getattr(mamba_ops, f) for f in FusedOps.TRITON}))
    assert all(fused.kernels.report[op].startswith("fused") for op in TRITON_OPS), fused.kernels.report
    t_ref, l_ref = _greedy(ref, prompts, 6)
    t_fused, l_fused = _greedy(fused, prompts, 6)
    assert t_fused == t_ref
    torch.testing.assert_close(l_fused, l_ref, atol=1e-4, rtol=1e-4)
