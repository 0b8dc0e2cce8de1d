"""Paged decode attention (Triton): one query token per row over its own KV blocks, read in place.

  q (B, hq, e); k_cache, v_cache (NB, block_size, hkv, e); block_tables (B, mb) long; positions (B,) long:
  row b attends to its tokens 0..positions[b] (length positions[b] + 1; entries of its table past that are
  never read: dummy blocks, padding rows). GQA: query head j reads KV head j // (hq / hkv). No positional
  encoding; softmax(scale * q.k) v. Returns (B, hq, e) in q's dtype.

Grid (B, hkv, splits) (flash-decoding): a program takes one row, one KV head with all its hq / hkv query
heads (each K/V value loaded serves them all) and one partition of PARTITION tokens, walks it BLOCK_N
tokens at a time (each token's block looked up in the row's table) with an online softmax in fp32. A
program whose partition starts past its row's length loads nothing. With more than one split a second
kernel merges the partial results. splits = ceil(mb * block_size / PARTITION) depends only on the table's
width, so a captured CUDA graph keeps its grid.

No tl.dot: (hq / hkv = 4) x BLOCK_N products are too small for tensor cores and decode is bandwidth-bound;
broadcast products + sums also run under Triton's interpreter at any dtype (its bf16 tl.dot is broken).

kv_bytes_*: bytes one decode step moves for attention (all layers), from this kernel's access pattern and
from the gather + SDPA path it replaces, against the ideal (each live K/V row read once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PARTITION = 512  # tokens per program (split-K)
BLOCK_N = 32  # tokens per inner step


@triton.jit
def _paged_decode_kernel(Q, K, V, TABLES, POS, OUT, M, L,
                         stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                         stride_tb, stride_ob, stride_oh, stride_os, stride_mb, stride_mh, scale,
                         REP: tl.constexpr, REP_P: tl.constexpr, HEAD_DIM: tl.constexpr, E_P: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PARTITION: tl.constexpr,
                         SPLIT: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    length = tl.load(POS + b).to(tl.int32) + 1
    start = s * PARTITION
    if start < length:
        offs_r = tl.arange(0, REP_P)
        offs_e = tl.arange(0, E_P)
        mask_r = offs_r < REP
        mask_e = offs_e < HEAD_DIM
        heads = kvh * REP + offs_r
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_e[None, :],
                    mask=mask_r[:, None] & mask_e[None, :], other=0.0).to(tl.float32) * scale  # (REP_P, E_P)
        m_i = tl.full([REP_P], float("-inf"), tl.float32)
        l_i = tl.zeros([REP_P], tl.float32)
        acc = tl.zeros([REP_P, E_P], tl.float32)
        end = tl.minimum(start + PARTITION, length)
        for t0 in range(start, end, BLOCK_N):
            offs_n = t0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            blk = tl.load(TABLES + b * stride_tb + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
            tok = offs_n % BLOCK_SIZE
            kv_mask = mask_n[:, None] & mask_e[None, :]
            k = tl.load(K + (blk * stride_kb + tok * stride_kt + kvh * stride_kh)[:, None] + offs_e[None, :],
                        mask=kv_mask, other=0.0).to(tl.float32)  # (BLOCK_N, E_P)
            sc = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (REP_P, BLOCK_N)
            sc = tl.where(mask_n[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(V + (blk * stride_vb + tok * stride_vt + kvh * stride_vh)[:, None] + offs_e[None, :],
                        mask=kv_mask, other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m_i = m_new
        out = acc / l_i[:, None]
        o_mask = mask_r[:, None] & mask_e[None, :]
        o_ptr = OUT + b * stride_ob + heads[:, None] * stride_oh + s * stride_os + offs_e[None, :]
        if SPLIT:
            tl.store(o_ptr, out, mask=o_mask)
            tl.store(M + b * stride_mb + heads * stride_mh + s, m_i, mask=mask_r)
            tl.store(L + b * stride_mb + heads * stride_mh + s, l_i, mask=mask_r)
        else:
            tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=o_mask)


@triton.jit
def _merge_kernel(PART, M, L, POS, OUT, stride_pb, stride_ph, stride_ps, stride_mb, stride_mh, stride_ob,
                  stride_oh, HEAD_DIM: tl.constexpr, E_P: tl.constexpr, S_P: tl.constexpr,
                  PARTITION: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    n = (tl.load(POS + b).to(tl.int32) + PARTITION) // PARTITION  # splits that hold tokens: ceil(len / P)
    offs_s = tl.arange(0, S_P)
    offs_e = tl.arange(0, E_P)
    mask_s = offs_s < n
    m = tl.load(M + b * stride_mb + h * stride_mh + offs_s, mask=mask_s, other=float("-inf"))
    lsum = tl.load(L + b * stride_mb + h * stride_mh + offs_s, mask=mask_s, other=0.0)
    w = tl.where(mask_s, lsum * tl.exp(m - tl.max(m, axis=0)), 0.0)  # (S_P,)
    part = tl.load(PART + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_e[None, :],
                   mask=mask_s[:, None] & (offs_e[None, :] < HEAD_DIM), other=0.0)  # (S_P, E_P)
    out = tl.sum(w[:, None] * part, axis=0) / tl.sum(w, axis=0)
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_e, out.to(OUT.dtype.element_ty), mask=offs_e < HEAD_DIM)


def paged_decode_attention(q, k_cache, v_cache, block_tables, positions, scale: float,
                           partition: int = PARTITION, block_n: int = BLOCK_N) -> torch.Tensor:
    B, hq, e = q.shape
    _, bs, hkv, _ = k_cache.shape
    if hq % hkv or q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("paged_decode_attention: hq must be a multiple of hkv; q, k, v unit stride in e")
    if partition % block_n:
        raise ValueError(f"partition {partition} must be a multiple of block_n {block_n}")
    rep = hq // hkv
    splits = triton.cdiv(block_tables.shape[1] * bs, partition)
    out = torch.empty_like(q)
    meta = dict(REP=rep, REP_P=triton.next_power_of_2(rep), HEAD_DIM=e, E_P=triton.next_power_of_2(e),
                BLOCK_SIZE=bs, BLOCK_N=block_n, PARTITION=partition)
    kv = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
          v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
    with torch.cuda.device(q.device.index):
        if splits == 1:  # one partition per row: the kernel writes the final output (M, L unused)
            _paged_decode_kernel[(B, hkv, 1)](q, k_cache, v_cache, block_tables, positions, out, out, out,
                                              q.stride(0), q.stride(1), *kv, block_tables.stride(0),
                                              out.stride(0), out.stride(1), 0, 0, 0, scale, SPLIT=False, **meta)
            return out
        part = torch.empty(B, hq, splits, e, dtype=torch.float32, device=q.device)
        m = torch.empty(B, hq, splits, dtype=torch.float32, device=q.device)
        lsum = torch.empty_like(m)
        _paged_decode_kernel[(B, hkv, splits)](q, k_cache, v_cache, block_tables, positions, part, m, lsum,
                                               q.stride(0), q.stride(1), *kv, block_tables.stride(0),
                                               part.stride(0), part.stride(1), part.stride(2), m.stride(0),
                                               m.stride(1), scale, SPLIT=True, **meta)
        _merge_kernel[(B, hq)](part, m, lsum, positions, out, part.stride(0), part.stride(1), part.stride(2),
                               m.stride(0), m.stride(1), out.stride(0), out.stride(1), HEAD_DIM=e,
                               E_P=meta["E_P"], S_P=triton.next_power_of_2(splits), PARTITION=partition)
    return out


# ---- bytes moved per decode step (all attention layers) ------------------------------------------------

def kv_bytes_ideal(lengths, kv_heads, head_dim, elem_bytes, block_size, layers) -> int:
    """Every live K and V row (one token, one KV head) read exactly once."""
    return layers * sum(lengths) * kv_heads * head_dim * elem_bytes * 2


def kv_bytes_paged(lengths, q_heads, kv_heads, head_dim, elem_bytes, block_size, layers, width=None,
                   partition=PARTITION) -> int:
    """This kernel: each live K/V row once (masked loads fetch nothing past a row's length), plus per live
    program its query heads, its table entries and (split) its partial result written and merged back,
    plus the output. `width` (blocks per table) defaults to the longest row's."""
    width = width or max(-(-n // block_size) for n in lengths)
    splits = -(-width * block_size // partition)
    rep, total = q_heads // kv_heads, 0
    for n in lengths:
        live = -(-n // partition)  # programs per KV head that load anything
        total += n * kv_heads * head_dim * elem_bytes * 2  # K and V rows
        total += kv_heads * (live * rep * head_dim * elem_bytes + -(-n // block_size) * 8)  # q, table entries
        if splits > 1:
            total += 2 * live * q_heads * (head_dim + 2) * 4  # fp32 partial o, m, l: written, then read
        total += q_heads * head_dim * elem_bytes  # output
    return layers * total


def kv_bytes_gather(lengths, q_heads, kv_heads, head_dim, elem_bytes, block_size, layers, width=None) -> int:
    """The gather path (k_cache[block_tables] + SDPA with a mask): every row gathers `width` blocks (the
    longest row's), the copy is written and read back by SDPA, plus the (B, T) mask."""
    width = width or max(-(-n // block_size) for n in lengths)
    t = width * block_size
    rows = len(lengths) * t * kv_heads * head_dim * elem_bytes * 2  # K and V, one pass
    return layers * (3 * rows + len(lengths) * t + len(lengths) * q_heads * head_dim * elem_bytes * 2)
