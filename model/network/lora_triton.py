"""The LoRA delta on CUDA: a segmented shrink / expand in two Triton kernels (as punica's SGMV and S-LoRA do), the
op model/network/kernels.py picks for Kernels.lora on CUDA (model/network/lora.py lora_reference is the formula).

A step's rows form segments, each a run of consecutive rows on one adapter (a prefill chunk's tokens; one row per
segment in fixed-buffer decode, where the per-row index buffer is the segments' adapters: a CUDA-graph input):
  shrink  t[rows of s] = x[rows of s] @ A[ad_s]^T          (rows, R) in fp32, blocks of BLOCK_M rows x all R
  expand  y[rows of s] += t[rows of s] @ B[ad_s]^T          blocks of BLOCK_M rows x BLOCK_N outputs, in place
Segments whose adapter is -1 do nothing; rows outside every segment are never read or written (exactly as
without adapters). R is the stacks' rank (MAX_LORA_RANK) rounded up to a power of two >= 16 (tl.dot's minimum),
masked past the real rank.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 16
BLOCK_K = 64
BLOCK_N = 64


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, t_ptr, seg_start, seg_len, seg_ad, K, R_real, sxm, sal, sar, stm,
                   R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    s = tl.program_id(0)
    mb = tl.program_id(1)
    ad = tl.load(seg_ad + s)
    n = tl.load(seg_len + s)
    if (ad >= 0) & (mb * BLOCK_M < n):
        start = tl.load(seg_start + s).to(tl.int64)
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < n
        r = tl.arange(0, R)
        rmask_r = r < R_real
        acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < K
            xb = tl.load(x_ptr + (start + rows)[:, None] * sxm + k[None, :], mask=rmask[:, None] & kmask[None, :],
                         other=0.0)
            ab = tl.load(a_ptr + ad.to(tl.int64) * sal + r[None, :] * sar + k[:, None],
                         mask=kmask[:, None] & rmask_r[None, :], other=0.0)  # (BLOCK_K, R): A^T
            # fp32 operands: bf16 tl.dot is wrong under the interpreter; tf32 tensor cores on the GPU for bf16 models
            acc += tl.dot(xb.to(tl.float32), ab.to(tl.float32), input_precision=PRECISION)
        tl.store(t_ptr + (start + rows)[:, None] * stm + r[None, :], acc, mask=rmask[:, None])


@triton.jit
def _expand_kernel(t_ptr, b_ptr, y_ptr, seg_start, seg_len, seg_ad, OUT, R_real, stm, sbl, sbo, sym,
                   R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    s = tl.program_id(0)
    mb = tl.program_id(1)
    nb = tl.program_id(2)
    ad = tl.load(seg_ad + s)
    n = tl.load(seg_len + s)
    if (ad >= 0) & (mb * BLOCK_M < n):
        start = tl.load(seg_start + s).to(tl.int64)
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < n
        r = tl.arange(0, R)
        o = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        omask = o < OUT
        tb = tl.load(t_ptr + (start + rows)[:, None] * stm + r[None, :], mask=rmask[:, None], other=0.0)
        bb = tl.load(b_ptr + ad.to(tl.int64) * sbl + o[None, :] * sbo + r[:, None],
                     mask=(r < R_real)[:, None] & omask[None, :], other=0.0).to(tl.float32)  # (R, BLOCK_N): B^T
        d = tl.dot(tb, bb, input_precision=PRECISION)
        yp = y_ptr + (start + rows)[:, None] * sym + o[None, :]
        m = rmask[:, None] & omask[None, :]
        yb = tl.load(yp, mask=m, other=0.0)
        tl.store(yp, (yb.to(tl.float32) + d).to(yb.dtype), mask=m)


def lora_segments(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor, starts: torch.Tensor,
                  lens: torch.Tensor, adapters: torch.Tensor, max_len: int) -> torch.Tensor:
    """y[rows of each segment] += (x A_ad^T) B_ad^T, in place; A (L, r, K) contiguous, B (L, OUT, r) with r
    contiguous (model/network/lora.py stores it (OUT, L, r));
    starts / lens / adapters (S,) integer tensors on the device (adapter -1: the segment is skipped); max_len:
    an upper bound of lens (sizes the grid)."""
    S = starts.shape[0]
    if S == 0 or max_len == 0:
        return y
    N, K = x.shape
    r_real = A.shape[1]
    R = max(16, triton.next_power_of_2(r_real))
    x = x if x.stride(-1) == 1 else x.contiguous()
    assert y.stride(-1) == 1 and A.is_contiguous() and B.stride(-1) == 1
    t = torch.empty((N, R), dtype=torch.float32, device=x.device)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    mblocks = triton.cdiv(max_len, BLOCK_M)
    _shrink_kernel[(S, mblocks)](x, A, t, starts, lens, adapters, K, r_real, x.stride(0), A.stride(0), A.stride(1),
                                 t.stride(0), R=R, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, PRECISION=prec)
    out = B.shape[1]
    _expand_kernel[(S, mblocks, triton.cdiv(out, BLOCK_N))](
        t, B, y, starts, lens, adapters, out, r_real, t.stride(0), B.stride(0), B.stride(1), y.stride(0),
        R=R, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PRECISION=prec)
    return y


def lora_triton(x, y, A, B, step) -> torch.Tensor:
    """Kernels.lora on CUDA: the step's segments (model/network/lora.py LoraStep.segments)."""
    starts, lens, adapters, max_len = step.segments()
    return lora_segments(x, y, A, B, starts, lens, adapters, max_len)
