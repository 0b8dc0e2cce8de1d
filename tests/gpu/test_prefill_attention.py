"""Prefill attention on CUDA (model/network/prefill_attention.py causal_cuda, make test-gpu): the CPU path's results, a
fused SDPA kernel (flash for bf16 with grouped KV heads, memory-efficient for fp32), and a peak within what the
memory budget keeps back for it (model/runtime/state.py prefill_attention_bytes), up to a 128K context."""

from __future__ import annotations

import pytest
import torch
from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention

from bench.prefill_memory import MICRO_ATTN, attention_case
from model.network import prefill_attention as pa
from model.network.kernels import Kernels
from model.runtime.state import prefill_attention_bytes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("starts,lengths", [([0], [512]), ([3584], [512]), ([0, 1500, 0, 700, 700],
                                                                            [128, 100, 37, 256, 3])])
def test_matches_the_cpu_path_within_the_budget(dtype, starts, lengths):
    a = MICRO_ATTN
    q, kc, vc, pk, tk = attention_case(starts, lengths, "cuda", dtype)
    K = Kernels("reference", "cuda")  # the prefill attention is chosen by device, not by the fused ops
    K.prefill_attention(q, kc, vc, pk, a.attention_multiplier)  # warm
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = K.prefill_attention(q, kc, vc, pk, a.attention_multiplier)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= prefill_attention_bytes(a, sum(lengths), len(starts), tk, max(lengths), dtype), peak
    cq, ckc, cvc, cpk, _ = attention_case(starts, lengths)
    ref = pa.prefill_attention(cq, ckc, cvc, cpk, a.attention_multiplier, pa.causal_cpu)
    torch.testing.assert_close(got.float().cpu(), ref, **TOL[dtype])


def test_a_fused_kernel_takes_every_call():
    """bf16 with grouped heads: flash; fp32 (heads repeated by causal_cuda): memory-efficient. Neither needs a
    mask, so CausalBias never falls back to materialising one."""
    a = MICRO_ATTN
    q = torch.zeros(1, a.n_heads, 512, a.head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.zeros(1, a.n_kv_heads, 4096, a.head_dim, device="cuda", dtype=torch.bfloat16)
    assert can_use_flash_attention(SDPAParams(q, k, k, None, 0.0, False, True), True)
    q, k = q.float(), k.float().repeat_interleave(a.n_heads // a.n_kv_heads, 1)
    assert can_use_efficient_attention(SDPAParams(q, k, k, None, 0.0, False, False), True)


def test_128k_context_peak_is_linear():
    """512 queries over 128K keys in bf16: the peak is the gathered K / V and a few (L, heads, head_dim)
    outputs; a (512, 131072) mask alone, tiled per KV group and copied to bf16, would be 0.8 GiB."""
    a, L, tk = MICRO_ATTN, 512, 131072
    q, kc, vc, pk, _ = attention_case([tk - L], [L], "cuda", torch.bfloat16)
    K = Kernels("reference", "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    K.prefill_attention(q, kc, vc, pk, a.attention_multiplier)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    gathered = 2 * tk * a.n_kv_heads * a.head_dim * 2
    assert peak <= prefill_attention_bytes(a, L, 1, tk, L, torch.bfloat16) and peak < gathered + (64 << 20), peak
