"""The engine's fused path end to end on CPU tensors: ModelRunner with the real mamba-ssm kernels (conv: the
causal-conv1d fakes), on a small checkpoint, against Hugging Face's model (fp32) and the reference path.

One step packs fresh prompts (one varlen SSD call, the first ending inside SSD chunk 0) next to a continued
chunk of a longer prompt and decode rows; static decode pads its batch buckets with the dummy slot.
"""

from __future__ import annotations

import pytest
import torch

from bench.host_syncs import count_syncs, exempt
from model.network.fused_ops import FusedOps
from model.network.kernels import Kernels
from model.runtime.runner import ModelRunner
from model.types import EngineConfig, SeqChunk, StepBatch

# 3 layers (mamba, attention, mamba); Mamba 4 heads x 16, d_state 16, SSD chunk 16: ~1 s per fused call.
SMALL = dict(hidden_size=32, num_hidden_layers=3, attention_layers=(1,), num_attention_heads=4,
             num_key_value_heads=2, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=16)
PROMPTS = [[5 + i % 40 for i in range(7)], [60 + (7 * i) % 200 for i in range(23)], [300 + i for i in range(41)]]
FIRST = 30  # the 41-token prompt prefills 30 tokens, then its last 11 continue next to decode rows
NEW = 5


@pytest.fixture(scope="module")
def small_ckpt(ckpt_factory):
    return ckpt_factory("tiny", seed=3, **SMALL)


def _runner(ckpt, interp_ops, mode, fused=True):
    r = ModelRunner(ckpt, EngineConfig(max_concurrent_seqs=4, max_input_tokens=64, max_total_tokens=96,
                                       kv_cache_tokens=512, device="cpu"), decode_mode=mode)
    if fused:
        r.kernels = Kernels("fused", "cpu", fused=interp_ops)
        assert r.kernels.report["ssd_prefill"] == "fused:mamba_chunk_scan_combined"
        assert r.kernels.report["ssm_decode"] == "fused:selective_state_update"
    return r


def _greedy(r):
    """Greedy tokens for PROMPTS (all three prefilled together, the long one in two chunks) and the logits."""
    slots = [r.allocator.allocate(len(p) + NEW) for p in PROMPTS]
    a, b, c = PROMPTS
    rows = [r.forward(StepBatch((SeqChunk.fresh(slots[0], tuple(a), True), SeqChunk.fresh(slots[1], tuple(b), True),
                                 SeqChunk.fresh(slots[2], tuple(c[:FIRST]), False))))]
    toks = [[t] for t in rows[0].argmax(-1).tolist()] + [[]]
    rows.append(r.forward(StepBatch((SeqChunk.decode(slots[0], toks[0][-1], len(a)),
                                     SeqChunk.cont(slots[2], tuple(c[FIRST:]), FIRST, True),
                                     SeqChunk.decode(slots[1], toks[1][-1], len(b))))))
    step = rows[-1].argmax(-1).tolist()
    toks[0].append(step[0])
    toks[2].append(step[1])
    toks[1].append(step[2])
    while min(len(t) for t in toks) < NEW:
        live = [i for i in range(3) if len(toks[i]) < NEW]
        out = r.forward(StepBatch(tuple(SeqChunk.decode(slots[i], toks[i][-1], len(PROMPTS[i]) + len(toks[i]) - 1)
                                        for i in live)))
        rows.append(out)
        for i, t in zip(live, out.argmax(-1).tolist(), strict=True):
            toks[i].append(t)
    return toks, torch.cat(rows), r.pool.ssm[:, slots].clone()


@pytest.fixture(scope="module")
def hf_tokens(small_ckpt, hf_reference):
    from transformers import GraniteMoeHybridForCausalLM

    hf = GraniteMoeHybridForCausalLM.from_pretrained(small_ckpt, dtype=torch.float32).eval()
    with torch.no_grad(), hf_reference():
        return [hf.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                            pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_greedy_tokens_match_hf_and_reference(small_ckpt, interp_ops, hf_tokens, mode):
    toks, logits, ssm = _greedy(_runner(small_ckpt, interp_ops, mode))
    assert toks == hf_tokens
    ref_toks, ref_logits, ref_ssm = _greedy(_runner(small_ckpt, interp_ops, mode, fused=False))
    assert ref_toks == hf_tokens
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ssm, ref_ssm, atol=1e-4, rtol=1e-4)


def test_packed_prefill_equals_one_at_a_time_without_host_syncs(small_ckpt, interp_ops):
    """Fresh prompts (one varlen call) and a continued chunk of uneven lengths in one packed step == each chunk
    alone, on the fused path; and no layer reads a tensor back to the host (the kernels' own host reads
    under the interpreter are exempt: on a GPU they launch without a sync)."""
    ops = FusedOps(*(exempt(getattr(interp_ops, f)) for f in ("mamba_chunk_scan_combined", "selective_state_update",
                                                                "causal_conv1d_fn", "causal_conv1d_update")), {})
    outs = []
    for packed in (True, False):
        r = _runner(small_ckpt, ops, "eager")
        slots = [r.allocator.allocate(48) for _ in PROMPTS]
        r.forward(StepBatch((SeqChunk.fresh(slots[2], tuple(PROMPTS[2][:9]), False),)))
        chunks = (SeqChunk.fresh(slots[0], tuple(PROMPTS[0]), True), SeqChunk.cont(slots[2], tuple(PROMPTS[2][9:]), 9, True),
                  SeqChunk.fresh(slots[1], tuple(PROMPTS[1]), True))
        if packed:
            with count_syncs() as syncs:
                logits = r.forward(StepBatch(chunks))
            assert syncs.count == 0, syncs.by_kind
        else:
            logits = torch.cat([r.forward(StepBatch((c,))) for c in chunks])
        idx = torch.tensor(slots)
        outs.append([logits, r.pool.conv[:, idx], r.pool.ssm[:, idx], r.pool.k, r.pool.v])
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
