import pytest
import torch

from bench.capacity import (
    A10G,
    CHUNK_TOKENS,
    CONTEXTS,
    CUDA_CONTEXT_BYTES,
    INSTANCES,
    MIB,
    STEP_TOKENS,
    WEIGHT_BYTES,
    capacity,
    micro_arch,
    per_gpu_rows,
    per_seq_bytes,
    prefill_bytes,
    sequence_budget_bytes,
    was_mask_bytes,
)
from model.runtime.state import (
    CUDA_FIXED_RESERVE,
    CUDA_FREE_FRACTION,
    cuda_kv_tokens,
    cuda_reserve_bytes,
    decode_step_bytes,
    kv_bytes_per_token,
    prefill_attention_bytes,
    state_bytes_per_seq,
)


def test_full_size_state_matches_granite_numbers():
    arch = micro_arch()
    assert (arch.n_mamba, arch.n_attention) == (36, 4)
    # GRANITE.md: 8 KiB of KV per token; SSM state 36 layers x 64 heads x 64 x 128 x 2 B, plus the conv
    # state of 36 layers x 4352 channels x (d_conv - 1 = 3) columns x 2 B.
    assert kv_bytes_per_token(arch, torch.bfloat16) == 8 * 1024
    assert state_bytes_per_seq(arch, torch.bfloat16, torch.bfloat16) == 36 * 64 * 64 * 128 * 2 + 36 * 4352 * 3 * 2


def test_counts_fill_the_budget_exactly():
    arch = micro_arch()
    rows = capacity(arch)
    assert CONTEXTS == (8192, 32768, 131072)
    assert [r["instance"] for r in rows] == [name for name, _, _ in INSTANCES]
    for row, (_, n_gpus, gpu) in zip(rows, INSTANCES, strict=True):
        for ctx in CONTEXTS:
            n = row[f"seqs_{ctx // 1024}k_per_gpu"]
            # n sequences fit beside the prefill step of n slots; n + 1 do not beside that of n + 1
            assert n * per_seq_bytes(arch, ctx) <= sequence_budget_bytes(gpu, arch, ctx, n)
            assert (n + 1) * per_seq_bytes(arch, ctx) > sequence_budget_bytes(gpu, arch, ctx, n + 1)
            assert row[f"seqs_{ctx // 1024}k_total"] == n * n_gpus
            assert row[f"prefill_step_gib_{ctx // 1024}k"] == round(prefill_bytes(arch, ctx, n) / 2**30, 2)
        assert row["replicas"] == n_gpus
        assert row["seqs_8k_per_gpu"] > row["seqs_32k_per_gpu"] > row["seqs_128k_per_gpu"] > 0


@pytest.mark.parametrize("chunk", [CHUNK_TOKENS, STEP_TOKENS])
def test_admission_at_128k_on_a10g_keeps_the_prefill_step_back(chunk):
    """The engine's own KV sizing (cuda_kv_tokens, paged decode, prefix cache off) for the table's count on a
    24 GB A10G at 128K: every admitted sequence can reach 128K, the reserve holds the decode graph and the
    prefill step with its attention temporaries, and pool + reserve fit the card's share. One more slot
    leaves less than a full pool: admission is exact."""
    arch, ctx, bf16 = micro_arch(), 131072, torch.bfloat16
    n = next(r["seqs_128k_per_gpu"] for r in capacity(arch) if r["gpu"] == A10G.name)
    free = int(A10G.memory_mib * MIB - WEIGHT_BYTES - CUDA_CONTEXT_BYTES)
    if chunk == STEP_TOKENS:  # 2,048-token chunks: a bigger prefill step, still a fitting, exact count
        n = max(k for k in range(1, n + 1) if cuda_kv_tokens(arch, k, ctx, STEP_TOKENS, free, bf16, bf16, paged=True,
                                                             chunk_tokens=chunk) == k * ctx)
    tokens = cuda_kv_tokens(arch, n, ctx, STEP_TOKENS, free, bf16, bf16, paged=True, chunk_tokens=chunk)
    assert tokens == n * ctx
    reserve = cuda_reserve_bytes(arch, n, ctx, STEP_TOKENS, bf16, paged=True, chunk_tokens=chunk)
    attn = prefill_attention_bytes(arch, STEP_TOKENS, n, ctx, chunk, bf16)
    assert attn >= ctx * kv_bytes_per_token(arch, bf16) // arch.n_attention  # a 128K row's K and V, gathered
    assert reserve >= CUDA_FIXED_RESERVE + decode_step_bytes(arch, n, ctx, bf16, True) + attn
    used = reserve + tokens * kv_bytes_per_token(arch, bf16) + (n + 1) * state_bytes_per_seq(arch, bf16, bf16)
    assert used <= free * CUDA_FREE_FRACTION
    assert cuda_kv_tokens(arch, n + 1, ctx, STEP_TOKENS, free, bf16, bf16, paged=True, chunk_tokens=chunk) \
        < (n + 1) * ctx


def test_prefill_term_is_linear_in_the_context_and_replaces_a_quadratic_one():
    arch, bf16 = micro_arch(), torch.bfloat16
    kv_layer = kv_bytes_per_token(arch, bf16) // arch.n_attention  # gathered K + V per key row, one layer
    a64, a128 = (prefill_attention_bytes(arch, STEP_TOKENS, 1, c, CHUNK_TOKENS, bf16) for c in (65536, 131072))
    assert a128 - a64 == 65536 * kv_layer  # the extra context costs its gathered keys, nothing per query
    assert was_mask_bytes(arch, 131072) == CHUNK_TOKENS * 131072 * (1 + 4 + 4 * 2)  # bool, tiled x4, bf16 copy
    for d in per_gpu_rows(capacity(arch), arch):
        assert d["prefill_attention_gib_128k"] <= d["prefill_step_gib_128k"]
