"""Prefill attention (model/network/prefill_attention.py) against dense masked attention over each sequence's own keys:
fresh, continued and packed prefills, rows of one start with different lengths, scattered KV blocks, GQA.
causal_cuda runs here on CPU tensors: its glue (head repetition, causal_lower_right, the GQA flag) is checked
numerically, the kernel SDPA then picks on a GPU is tests/gpu's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from model.network import prefill_attention as pa
from model.network.packed import Packed

BS, HQ, HKV, E = 4, 8, 2, 16
CASES = {
    "fresh": ([0], [13]),
    "fresh_packed": ([0, 0, 0], [5, 16, 1]),
    "continued": ([9], [7]),
    "one_start_two_lengths": ([6, 6], [3, 10]),
    "mixed": ([0, 21, 0, 6, 6], [12, 5, 3, 9, 1]),
}


def _case(starts, lengths, dtype, seed=0):
    """Random pool and per-token q; each sequence's blocks scattered over the pool, as the allocator leaves them."""
    gen = torch.Generator().manual_seed(seed)
    nbs = [-(-(s + n) // BS) + 1 for s, n in zip(starts, lengths, strict=True)]  # one spare block past the end
    perm = torch.randperm(sum(nbs) + 3, generator=gen).tolist()
    tables, at = [], 0
    for nb in nbs:
        tables.append(perm[at:at + nb])
        at += nb
    k_cache = torch.randn(len(perm) + 1, BS, HKV, E, generator=gen).to(dtype)
    v_cache = torch.randn(len(perm) + 1, BS, HKV, E, generator=gen).to(dtype)
    q = torch.randn(sum(lengths), HQ, E, generator=gen).to(dtype)
    pk = Packed.build(list(range(len(starts))), starts, lengths, tables, BS, len(perm), "cpu")
    return q, k_cache, v_cache, pk, tables


def _dense(q, k_cache, v_cache, starts, lengths, tables, scale):
    """Per sequence: its keys [0, start + n) in order, an explicit (n, start + n) mask, K/V repeated per head."""
    out, off = [], 0
    for s, n, t in zip(starts, lengths, tables, strict=True):
        k = k_cache[t].flatten(0, 1)[:s + n].double().transpose(0, 1).repeat_interleave(HQ // HKV, 0)
        v = v_cache[t].flatten(0, 1)[:s + n].double().transpose(0, 1).repeat_interleave(HQ // HKV, 0)
        mask = torch.arange(s + n)[None, :] <= s + torch.arange(n)[:, None]
        out.append(F.scaled_dot_product_attention(q[off:off + n].double().transpose(0, 1), k, v, attn_mask=mask,
                                                  scale=scale).transpose(0, 1))
        off += n
    return torch.cat(out)


@pytest.mark.parametrize("causal", [pa.causal_cpu, pa.causal_cuda], ids=["cpu", "cuda_glue"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_dense_masked_attention(case, causal):
    starts, lengths = CASES[case]
    q, kc, vc, pk, tables = _case(starts, lengths, torch.float32)
    assert len(pk.attn) == len(set(starts))  # one call per distinct start
    got = pa.prefill_attention(q, kc, vc, pk, 0.3, causal)
    torch.testing.assert_close(got, _dense(q, kc, vc, starts, lengths, tables, 0.3).float(), atol=2e-6, rtol=2e-5)


def test_cuda_glue_keeps_grouped_heads_when_flash_takes_them(monkeypatch):
    """Where flash attention can run (bf16 / fp16 on a GPU) the KV heads are passed as they are (enable_gqa):
    no hq / hkv x copy of the gathered keys. On CPU the SDPA call that follows is torch's own fallback."""
    calls = []

    class Spy(TorchFunctionMode):  # sees each SDPA call before the CausalBias subclass handles it
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                calls.append((args[1].shape[1], kwargs.get("enable_gqa")))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(pa, "can_use_flash_attention", lambda params: True)
    starts, lengths = CASES["mixed"]
    q, kc, vc, pk, tables = _case(starts, lengths, torch.float32)
    with Spy():
        got = pa.prefill_attention(q, kc, vc, pk, 0.3, pa.causal_cuda)
    assert len(calls) == len(set(starts)) and all(c == (HKV, True) for c in calls)
    torch.testing.assert_close(got, _dense(q, kc, vc, starts, lengths, tables, 0.3).float(), atol=2e-6, rtol=2e-5)


def test_cpu_bf16_merges_in_fp32():
    starts, lengths = CASES["mixed"]
    q, kc, vc, pk, tables = _case(starts, lengths, torch.bfloat16)
    got = pa.prefill_attention(q, kc, vc, pk, 0.3, pa.causal_cpu)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), _dense(q, kc, vc, starts, lengths, tables, 0.3).float(), atol=2e-2,
                               rtol=2e-2)
