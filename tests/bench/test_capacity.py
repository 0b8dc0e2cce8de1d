import torch

from bench.capacity import CONTEXTS, INSTANCES, capacity, micro_arch, per_seq_bytes, sequence_budget_bytes
from model.state import kv_bytes_per_token, state_bytes_per_seq


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
    assert [r["instance"] for r in rows] == [name for name, _, _ in INSTANCES]
    for row, (_, n_gpus, gpu) in zip(rows, INSTANCES, strict=True):
        budget = sequence_budget_bytes(gpu, arch)
        for ctx in CONTEXTS:
            n = row[f"seqs_{ctx // 1024}k_per_gpu"]
            assert n * per_seq_bytes(arch, ctx) <= budget < (n + 1) * per_seq_bytes(arch, ctx)
            assert row[f"seqs_{ctx // 1024}k_total"] == n * n_gpus
        assert row["replicas"] == n_gpus
        assert row["seqs_4k_per_gpu"] > row["seqs_32k_per_gpu"] > 0
