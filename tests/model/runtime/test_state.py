"""StatePool layout and the memory formula (checked for the real Granite 4.0 H micro by arithmetic only)."""

from __future__ import annotations

import json

import pytest
import torch

from model.network.granite import GraniteArch
from model.runtime.state import (
    StatePool,
    auto_kv_tokens,
    bytes_per_seq,
    kv_bytes_per_token,
    state_bytes_per_seq,
)

MIB = 2**20

MICRO = {  # config.json values of ibm-granite/granite-4.0-h-micro that matter here (GRANITE.md)
    "model_type": "granitemoehybrid", "vocab_size": 100352, "hidden_size": 2048, "num_hidden_layers": 40,
    "layer_types": ["full_attention" if i in (5, 15, 25, 35) else "linear_attention" for i in range(40)],
    "num_attention_heads": 32, "num_key_value_heads": 8, "shared_intermediate_size": 8192,
    "num_local_experts": 0, "mamba_n_heads": 64, "mamba_d_head": 64, "mamba_d_state": 128,
    "mamba_n_groups": 1, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_chunk_size": 256,
    "position_embedding_type": "nope", "attention_multiplier": 0.015625, "embedding_multiplier": 12,
    "residual_multiplier": 0.22, "logits_scaling": 8, "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    d = tmp_path_factory.mktemp("micro_cfg")
    (d / "config.json").write_text(json.dumps(MICRO))
    return GraniteArch.from_dir(d)


def test_micro_formula_matches_granite_md(micro):
    bf16 = torch.bfloat16
    assert (micro.n_mamba, micro.n_attention, micro.conv_dim) == (36, 4, 4352)
    ssm = 36 * 64 * 64 * 128 * 2
    conv = 36 * 4352 * 3 * 2
    assert state_bytes_per_seq(micro, bf16, bf16) == ssm + conv
    assert kv_bytes_per_token(micro, bf16) == 4 * 2 * 8 * 64 * 2 == 8 * 1024
    assert ssm / MIB == 36.0  # "37.2 MiB" in GRANITE.md is 37.7 MB = 36 MiB
    # 69 MiB at 4K, 293 MiB at 32K, "1.06 GiB" at 128K (GRANITE.md; it is 1061 MiB), bf16 everywhere
    assert round(bytes_per_seq(micro, 4096, bf16, bf16) / MIB) == 69
    assert round(bytes_per_seq(micro, 32768, bf16, bf16) / MIB) == 293
    assert round(bytes_per_seq(micro, 131072, bf16, bf16) / MIB) == 1061
    # fp32 SSM state doubles the SSM part only
    assert state_bytes_per_seq(micro, bf16, torch.float32) == 2 * ssm + conv


def test_pool_shapes_match_formula_on_meta(micro):
    pool = StatePool(micro, num_slots=32, kv_tokens=4096, device="meta", dtype=torch.bfloat16,
                     ssm_dtype=torch.bfloat16, block_size=16)
    assert pool.conv.shape == (36, 33, 4352, 3)
    assert pool.ssm.shape == (36, 33, 64, 64, 128)
    assert pool.k.shape == pool.v.shape == (4, 257, 16, 8, 64)
    rep = pool.report()
    assert rep["pool_state_bytes"] == 33 * state_bytes_per_seq(micro, torch.bfloat16, torch.bfloat16)
    assert rep["pool_kv_bytes"] == 257 * 16 * kv_bytes_per_token(micro, torch.bfloat16)
    assert rep["kv_tokens"] == 4096 and rep["num_slots"] == 32


def test_reset_slots_zeroes_only_those_slots(tmp_path):
    from tests.tiny_granite import build_tiny

    build_tiny(tmp_path)
    a = GraniteArch.from_dir(tmp_path)
    pool = StatePool(a, 3, 40, "cpu", torch.float32, torch.bfloat16, block_size=8)
    assert pool.ssm.dtype == torch.bfloat16 and pool.num_blocks == 5 and pool.dummy_slot == 3
    pool.conv.fill_(1)
    pool.ssm.fill_(1)
    pool.reset_slots([0, 2])
    for s in (0, 2):
        assert float(pool.conv[:, s].abs().sum()) == 0 and float(pool.ssm[:, s].abs().sum()) == 0
    for s in (1, 3):
        assert bool((pool.conv[:, s] == 1).all()) and bool((pool.ssm[:, s] == 1).all())


def test_auto_kv_tokens_cpu(micro):
    cpu = torch.device("cpu")
    f32 = torch.float32
    assert auto_kv_tokens(micro, 4, 1000, 2048, cpu, f32, f32) == 4000
    assert auto_kv_tokens(micro, 256, 16384, 2048, cpu, f32, f32) == (2 << 30) // (16 * 1024)  # 16 KiB/token in fp32: capped at 2 GiB
    tiny = GraniteArch(**{**micro.__dict__, "n_kv_heads": 1, "head_dim": 2})
    assert auto_kv_tokens(tiny, 256, 131072, 2048, cpu, f32, f32) == 1 << 18  # capped at 256K tokens
    assert auto_kv_tokens(micro, 1, 1 << 20, 2048, cpu, f32, f32) == 1 << 20  # never below one full sequence


def test_decode_graph_memory_is_budgeted_from_the_limits(micro):
    """The KV gather temporaries of the widest decode graph (every slot at max_total_tokens) are kept out
    of the KV pool, instead of a fixed 2 GiB that 256 slots x 32K (16 GiB of gathers) would overrun."""
    from model.runtime.state import (
        CUDA_FIXED_RESERVE,
        CUDA_FREE_FRACTION,
        cuda_kv_tokens,
        cuda_reserve_bytes,
        decode_step_bytes,
    )

    bf16 = torch.bfloat16
    per_layer = kv_bytes_per_token(micro, bf16) // micro.n_attention  # k + v of one layer: 2 KiB
    assert per_layer == 2048
    # 32 x 16K: 1 GiB of gathered k and v, twice for SDPA's own layout, plus small per-row activations
    d = decode_step_bytes(micro, 32, 16384, bf16)
    assert 2 << 30 <= d < (2 << 30) + (64 << 20)
    assert decode_step_bytes(micro, 256, 32768, bf16) >= 32 << 30
    assert decode_step_bytes(micro, 2, 100, bf16) < decode_step_bytes(micro, 4, 100, bf16)
    free = 120 << 30  # an H200 after the weights
    state = state_bytes_per_seq(micro, bf16, bf16)
    for slots, total in ((32, 16384), (256, 32768), (64, 4096)):
        reserve = cuda_reserve_bytes(micro, slots, total, 2048, bf16)
        assert reserve > decode_step_bytes(micro, slots, total, bf16) + CUDA_FIXED_RESERVE
        tokens = cuda_kv_tokens(micro, slots, total, 2048, free, bf16, bf16)
        used = reserve + tokens * kv_bytes_per_token(micro, bf16) + (slots + 1) * state
        assert used <= free * CUDA_FREE_FRACTION  # pool + temporaries fit
        assert tokens == slots * total or used + kv_bytes_per_token(micro, bf16) > free * CUDA_FREE_FRACTION
    with pytest.raises(RuntimeError, match="step temporaries"):
        cuda_kv_tokens(micro, 1024, 131072, 2048, free, bf16, bf16)  # the gathers alone exceed the card


def test_snapshot_share_is_set_aside_before_the_kv_pool(micro):
    """Prefix-cache snapshots may copy up to snapshot_share x the pool's bytes on top of it (CUDA)."""
    from model.runtime.state import cuda_kv_tokens

    bf16, free = torch.bfloat16, 60 << 30
    full = cuda_kv_tokens(micro, 256, 32768, 2048, free, bf16, bf16)
    shared = cuda_kv_tokens(micro, 256, 32768, 2048, free, bf16, bf16, snapshot_share=0.25)
    assert full < 256 * 32768  # memory-bound, so the share shows
    assert shared < full and abs(shared * 1.25 - full) <= 1.25 * 1024


def test_paged_decode_budgets_no_gathered_kv(micro):
    """With the paged decode kernel the widest graph keeps only per-split partials, so slots x context
    no longer eats the pool: the same card holds far more KV."""
    from model.network import paged_attention
    from model.runtime.state import PAGED_SPLIT_TOKENS, cuda_kv_tokens, decode_step_bytes

    assert PAGED_SPLIT_TOKENS == paged_attention.PARTITION
    bf16 = torch.bfloat16
    gathered, paged = decode_step_bytes(micro, 32, 16384, bf16), decode_step_bytes(micro, 32, 16384, bf16, True)
    assert paged < gathered / 20
    assert decode_step_bytes(micro, 32, 16384, bf16, True) > decode_step_bytes(micro, 32, 512, bf16, True)
    free = 60 << 30
    assert cuda_kv_tokens(micro, 256, 32768, 2048, free, bf16, bf16, paged=True) > \
        cuda_kv_tokens(micro, 256, 32768, 2048, free, bf16, bf16)
