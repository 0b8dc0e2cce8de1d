"""The state pool: every live sequence's Mamba state (by slot) and KV (by paged block), allocated once.

Layout (S = slots + 1: the last slot is a dummy that padded CUDA-graph rows write into; likewise the
last KV block):
  conv (mamba_layers, S, conv_dim, d_conv - 1)          model dtype
  ssm  (mamba_layers, S, heads, head_dim, d_state)       ssm_state dtype (fp32 or bf16)
  k, v (attention_layers, blocks + 1, block_size, kv_heads, head_dim)   model dtype
"""

from __future__ import annotations

import math

import torch

from model.network.granite import GraniteArch
from model.network.packed import MAX_PACK_KEY_ROWS

BLOCK_SIZE = 16
CPU_MAX_KV_TOKENS = 1 << 18  # auto KV size on CPU: at most 256K tokens ...
CPU_MAX_KV_BYTES = 2 << 30  # ... and at most 2 GiB
CUDA_FREE_FRACTION = 0.90  # of the memory free after weights, for state + KV + the step temporaries
CUDA_FIXED_RESERVE = 1 << 30  # bytes kept back whatever the limits: cuBLAS/Triton workspaces, allocator slack
PAGED_SPLIT_TOKENS = 512  # model/paged_attention.PARTITION (not imported here: it needs triton)


def _nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def state_bytes_per_seq(a: GraniteArch, dtype: torch.dtype, ssm_dtype: torch.dtype) -> int:
    """Fixed per-sequence Mamba state: conv (d_conv - 1 columns) + SSM, all Mamba layers."""
    conv = a.n_mamba * a.conv_dim * (a.m_conv - 1) * _nbytes(dtype)
    ssm = a.n_mamba * a.m_heads * a.m_head_dim * a.m_state * _nbytes(ssm_dtype)
    return conv + ssm


def kv_bytes_per_token(a: GraniteArch, dtype: torch.dtype) -> int:
    return a.n_attention * 2 * a.n_kv_heads * a.head_dim * _nbytes(dtype)


def bytes_per_seq(a: GraniteArch, n_tokens: int, dtype: torch.dtype, ssm_dtype: torch.dtype) -> int:
    """Fixed Mamba state + KV per token (exact, not rounded to blocks): the README's memory formula."""
    return state_bytes_per_seq(a, dtype, ssm_dtype) + n_tokens * kv_bytes_per_token(a, dtype)


def row_activation_bytes(a: GraniteArch, dtype: torch.dtype) -> int:
    """Activations one token row holds inside one layer, with margin: the Mamba in_proj output, the MLP's
    gate/up pair and a few hidden-sized buffers (layers run one after another: one layer's worth)."""
    in_proj = 2 * a.m_inner + 2 * a.m_groups * a.m_state + a.m_heads
    return 2 * (in_proj + 2 * a.mlp_inner + 4 * a.hidden) * max(_nbytes(dtype), 4)


def decode_step_bytes(a: GraniteArch, batch: int, tokens: int, dtype: torch.dtype, paged: bool = False) -> int:
    """Temporaries of one decode step (one CUDA graph) of `batch` rows reading `tokens` KV positions each, plus
    the per-row activations. Gathered attention (the reference path) copies k and v (batch, tokens, kv_heads,
    head_dim) and SDPA may copy them into its own layout (x2), one layer at a time: the micro at 32 slots x
    16K, 2 GiB. The paged kernel (model/network/paged_attention.py) reads the cache in place and only keeps fp32
    partial results per 512-token split (out, max, sum per query head)."""
    if paged:
        splits = -(-max(tokens, 1) // PAGED_SPLIT_TOKENS)
        attn = batch * a.n_heads * splits * (a.head_dim + 2) * 4
    else:
        attn = 2 * batch * tokens * (kv_bytes_per_token(a, dtype) // max(a.n_attention, 1))
    return attn + batch * row_activation_bytes(a, dtype)


def prefill_padded_rows(step_tokens: int, num_slots: int, chunk_tokens: int) -> int:
    """Rows of the padded (b, L) view one packed prefill forward may hold: b <= min(slots, step) chunks, the
    longest <= min(chunk, step) tokens, and pack_runs keeps b x L <= MAX_PACK_KEY_ROWS when b > 1."""
    return min(min(num_slots, step_tokens) * min(chunk_tokens, step_tokens), max(step_tokens, MAX_PACK_KEY_ROWS))


def prefill_key_rows(step_tokens: int, num_slots: int, context_tokens: int) -> int:
    """K / V rows one attention group of a packed prefill gathers: n rows sharing a start, each up to
    past + width <= context_tokens keys, rounded up to whole blocks; pack_runs keeps n x that within
    MAX_PACK_KEY_ROWS unless the row is alone."""
    rows = max(context_tokens, min(MAX_PACK_KEY_ROWS, num_slots * context_tokens))
    return rows + min(num_slots, step_tokens) * BLOCK_SIZE


def prefill_attention_bytes(a: GraniteArch, step_tokens: int, num_slots: int, context_tokens: int,
                            chunk_tokens: int, dtype: torch.dtype, expand_heads: bool | None = None) -> int:
    """Temporaries of one attention layer's packed prefill (model/network/prefill_attention.py), its largest group:
      gathered K and V   2 x key rows x kv_heads x head_dim (x (1 + q_heads / kv_heads) when the KV heads are
                         repeated for a kernel without grouped heads: memory-efficient attention, i.e. fp32 on
                         CUDA, the default for expand_heads; flash takes bf16 / fp16 as they are)
      queries, outputs   5 x padded rows x q_heads x head_dim: the padded q, the kernel's output and its copy
                         in packed order, the packed output of a pack with several groups (the CPU merge's
                         folded q and second partial output take the place of the copies: 4 at its peak)
      log-sum-exps       4 x padded rows x q_heads fp32 (the CPU merge's two, their max and weights)
    Linear in the context and in the step: there is no (queries x keys) term (no mask, no score matrix)."""
    if expand_heads is None:
        expand_heads = dtype not in (torch.float16, torch.bfloat16)
    e = _nbytes(dtype)
    keys = prefill_key_rows(step_tokens, num_slots, context_tokens)
    kv = 2 * keys * a.n_kv_heads * a.head_dim * e * ((1 + a.n_heads // a.n_kv_heads) if expand_heads else 1)
    rows = prefill_padded_rows(step_tokens, num_slots, chunk_tokens)
    return kv + rows * a.n_heads * (5 * a.head_dim * e + 4 * 4)


def prefill_step_bytes(a: GraniteArch, step_tokens: int, num_slots: int, dtype: torch.dtype, context_tokens: int,
                       chunk_tokens: int | None = None, expand_heads: bool | None = None) -> int:
    """Temporaries of one packed prefill step of `step_tokens` tokens (chunks of at most chunk_tokens, default
    the whole step; sequences up to context_tokens): per-token activations; the Mamba layer's padded (b, L)
    views (pad(xbc), the conv's input with its state prepended and its output, the scan's gathered copy,
    pad(dt)); the SSD scan's fp32 chunk states (chunks, heads, head_dim, d_state, x3 for states / passing /
    output); the attention layer's (prefill_attention_bytes: linear in the context); the fp32 logits of at
    most one row per sequence. Layers run one after another: one layer's temporaries at a time."""
    chunk_tokens = step_tokens if chunk_tokens is None else chunk_tokens
    chunks = -(-step_tokens // max(a.m_chunk, 1)) + 1
    ssd = 3 * chunks * a.m_heads * a.m_head_dim * a.m_state * 4
    padded = prefill_padded_rows(step_tokens, num_slots, chunk_tokens) * (4 * a.conv_dim + 2 * a.m_heads) * _nbytes(dtype)
    attn = prefill_attention_bytes(a, step_tokens, num_slots, context_tokens, chunk_tokens, dtype, expand_heads)
    return (step_tokens * row_activation_bytes(a, dtype) + max(ssd + padded, attn)
            + min(step_tokens, num_slots) * a.vocab_size * 4)


def cuda_reserve_bytes(a: GraniteArch, num_slots: int, max_total_tokens: int, max_step_tokens: int,
                       dtype: torch.dtype, paged: bool = False, chunk_tokens: int | None = None) -> int:
    """Memory kept out of the KV pool on CUDA, from the limits: the widest decode graph (every slot at
    max_total_tokens), the largest prefill step (sequences up to max_total_tokens) and a fixed reserve."""
    return (CUDA_FIXED_RESERVE + decode_step_bytes(a, num_slots, max_total_tokens, dtype, paged)
            + prefill_step_bytes(a, max_step_tokens, num_slots, dtype, max_total_tokens, chunk_tokens))


def cuda_kv_tokens(a: GraniteArch, num_slots: int, max_total_tokens: int, max_step_tokens: int, free: int,
                   dtype: torch.dtype, ssm_dtype: torch.dtype, snapshot_share: float = 0.0,
                   paged: bool = False, chunk_tokens: int | None = None) -> int:
    """KV pool tokens that fit `free` bytes of GPU memory (after the weights) beside the reserve. Prefix-cache
    snapshots may copy up to `snapshot_share` x the pool's bytes of Mamba state on top of the pool: that part
    is set aside first."""
    reserve = cuda_reserve_bytes(a, num_slots, max_total_tokens, max_step_tokens, dtype, paged, chunk_tokens)
    budget = int(free * CUDA_FREE_FRACTION) - reserve - (num_slots + 1) * state_bytes_per_seq(a, dtype, ssm_dtype)
    budget = int(budget / (1.0 + snapshot_share))
    tokens = min(num_slots * max_total_tokens, budget // max(kv_bytes_per_token(a, dtype), 1))
    if tokens < max_total_tokens:
        raise RuntimeError(
            f"not enough GPU memory for one sequence of {max_total_tokens} tokens with {num_slots} slots: "
            f"{free / 2**30:.1f} GiB free, {reserve / 2**30:.1f} GiB of it kept for the step temporaries "
            "(decode graphs read every slot at max_total_tokens); lower MAX_CONCURRENT_SEQS or MAX_TOTAL_TOKENS")
    return int(tokens)


def auto_kv_tokens(a: GraniteArch, num_slots: int, max_total_tokens: int, max_step_tokens: int,
                   device: torch.device, dtype: torch.dtype, ssm_dtype: torch.dtype, snapshot_share: float = 0.0,
                   paged: bool = False, chunk_tokens: int | None = None) -> int:
    """KV pool size when EngineConfig.kv_cache_tokens == 0 (snapshot_share, paged, chunk_tokens: see
    cuda_kv_tokens, cuda_reserve_bytes)."""
    if device.type != "cuda":
        cap = min(CPU_MAX_KV_TOKENS, CPU_MAX_KV_BYTES // max(kv_bytes_per_token(a, dtype), 1))
        return max(min(num_slots * max_total_tokens, cap), max_total_tokens)
    free, _total = torch.cuda.mem_get_info(device)
    return cuda_kv_tokens(a, num_slots, max_total_tokens, max_step_tokens, free, dtype, ssm_dtype, snapshot_share,
                          paged, chunk_tokens)


def slot_runs(ordered: list[int]) -> tuple[tuple[int, int], ...]:
    """Sorted ints -> (first, count) of each run of consecutive values."""
    runs: list[list[int]] = []
    for v in ordered:
        if runs and v == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return tuple((a, n) for a, n in runs)


class StatePool:
    def __init__(self, a: GraniteArch, num_slots: int, kv_tokens: int, device, dtype: torch.dtype,
                 ssm_dtype: torch.dtype, block_size: int = BLOCK_SIZE) -> None:
        self.arch, self.num_slots, self.block_size = a, num_slots, block_size
        self.num_blocks = math.ceil(kv_tokens / block_size)
        self.dummy_slot, self.dummy_block = num_slots, self.num_blocks
        self.dtype, self.ssm_dtype = dtype, ssm_dtype
        s = num_slots + 1
        kw = {"device": device}
        self.conv = torch.zeros(a.n_mamba, s, a.conv_dim, a.m_conv - 1, dtype=dtype, **kw)
        self.ssm = torch.zeros(a.n_mamba, s, a.m_heads, a.m_head_dim, a.m_state, dtype=ssm_dtype, **kw)
        kv_shape = (a.n_attention, self.num_blocks + 1, block_size, a.n_kv_heads, a.head_dim)
        self.k = torch.zeros(kv_shape, dtype=dtype, **kw)
        self.v = torch.zeros(kv_shape, dtype=dtype, **kw)

    def reset_slots(self, slots: list[int]) -> None:
        """New sequences start from zero Mamba state (their KV blocks are simply overwritten). Each run of
        consecutive slots is one slice memset per pool (index_fill_ is ~3x slower than memsets on CPU)."""
        for first, count in slot_runs(sorted(slots)):
            self.conv[:, first:first + count].zero_()
            self.ssm[:, first:first + count].zero_()

    def report(self) -> dict:
        a = self.arch
        return {
            "state_bytes_per_seq": state_bytes_per_seq(a, self.dtype, self.ssm_dtype),
            "kv_bytes_per_token": kv_bytes_per_token(a, self.dtype),
            "num_slots": self.num_slots,
            "kv_blocks": self.num_blocks,
            "kv_block_size": self.block_size,
            "kv_tokens": self.num_blocks * self.block_size,
            "pool_state_bytes": self.conv.nbytes + self.ssm.nbytes,
            "pool_kv_bytes": self.k.nbytes + self.v.nbytes,
            "ssm_state_dtype": str(self.ssm_dtype).removeprefix("torch."),
        }
