"""Prefill attention over the paged KV without an (L, Tk) mask or any other (queries x keys) temporary.

A packed prefill (model/network/packed.py) holds chunks of several sequences; each chunk's L queries sit at positions
[past, past + L) of its sequence and attend to its keys [0, past + L): query l sees keys j <= past + l, a
causal mask whose diagonal is aligned to the lower right. Rows that share `past` form one AttnGroup and one
call: q (n, hq, L, e) over k, v (n, hkv, past + L, e) gathered from the row's blocks (linear in the context).
Shorter rows are padded at the end: a pad query sees only keys past its row's end and is dropped.

`causal(q, k, v, past, scale)` is chosen per device by model/network/kernels.py:
  causal_cuda  SDPA with torch.nn.attention.bias.causal_lower_right (is_causal when past == 0): flash
               attention takes it natively with grouped KV heads (bf16 / fp16); for other dtypes the KV heads
               are repeated to query-head width, which lets memory-efficient attention take it (it has no GQA,
               and without a fused kernel CausalBias would materialise the mask). No mask tensor either way.
  causal_cpu   past == 0: SDPA is_causal with grouped KV heads (CPU flash kernel, masked blocks skipped).
               past > 0: keys [0, past), visible to every query, in one unmasked call with the hq / hkv query
               heads of each KV head folded into rows; keys [past, past + L) in a square is_causal call; the
               two partial results merged by their log-sum-exp. (On CPU, CausalBias materialises the (L, Tk)
               mask and SDPA a float copy of it: this is what it avoids.)
The temporaries are the gathered K / V and a few (n, hq, L, e) outputs: see model/runtime/state.py
prefill_attention_bytes, which the memory budget counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.backends.cuda import SDPAParams, can_use_flash_attention

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # (out, logsumexp): what SDPA runs on CPU


def prefill_attention(q, k_cache, v_cache, pk, scale: float, causal) -> torch.Tensor:
    """q (T, hq, e) packed; k_cache, v_cache (NB, block_size, hkv, e) already holding the chunks' K / V;
    pk: the Packed of this forward (pk.attn: its rows grouped by start). Returns (T, hq, e) in q's dtype."""
    if len(pk.attn) == 1:
        return _group(q, k_cache, v_cache, pk.attn[0], scale, causal)
    out = torch.empty_like(q)
    for g in pk.attn:
        o = _group(q, k_cache, v_cache, g, scale, causal)
        if g.span is not None:
            out[g.span[0]:g.span[1]] = o
        else:
            out.index_copy_(0, g.packed, o)
    return out


def _group(q, k_cache, v_cache, g, scale: float, causal) -> torch.Tensor:
    """One AttnGroup -> its tokens' outputs (T_g, hq, e), in the group's packed order."""
    if g.span is not None:  # one row: its tokens are a slice of the pack
        qp = q[g.span[0]:g.span[1]][None]  # (1, L, hq, e)
    else:
        qp = torch.cat([q, q.new_zeros(1, *q.shape[1:])])[g.pad_index]  # (n, width, hq, e), zeros at pads
    tk = g.past + g.width
    keys = k_cache[g.blocks].flatten(1, 2)[:, :tk].to(q.dtype)  # (n, Tk, hkv, e): linear in the context
    vals = v_cache[g.blocks].flatten(1, 2)[:, :tk].to(q.dtype)
    o = causal(qp.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2), g.past, scale)  # (n, hq, width, e)
    o = o.transpose(1, 2)  # (n, width, hq, e)
    return o[0] if g.span is not None else o.flatten(0, 1)[g.unpad_index]


def causal_cuda(q, k, v, past: int, scale: float) -> torch.Tensor:
    """q (n, hq, L, e); k, v (n, hkv, past + L, e): query l sees keys [0, past + l]. Returns (n, hq, L, e)."""
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv and not can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, past == 0, True)):
        # memory-efficient attention (fp32, or flash unavailable) has no grouped heads: repeat them
        # (hq / hkv x the gathered K / V, still linear in the context; counted by the budget for fp32)
        k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    gqa = k.shape[1] != hq
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    from torch.nn.attention.bias import causal_lower_right  # here: importing it imports torch._dynamo (~3 s)

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]), scale=scale,
                                          enable_gqa=gqa)


def causal_cpu(q, k, v, past: int, scale: float) -> torch.Tensor:
    """As causal_cuda, with the CPU flash kernel (which knows only top-left causal masks)."""
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    n, hq, L, e = q.shape
    hkv = k.shape[1]
    # keys [0, past): no mask, so the rep query heads of KV head i become rep * L rows of head i (no GQA);
    # rows r * L + l of head i are query head i * rep + r, query l: o1 views back as (n, hq, L, e)
    o1, lse1 = _flash_cpu(q.reshape(n, hkv, hq // hkv * L, e), k[:, :, :past], v[:, :, :past], 0.0, False,
                          scale=scale)
    # keys [past, past + L): the square diagonal block, top-left causal == lower-right when square
    o2, lse2 = _flash_cpu(q, k[:, :, past:], v[:, :, past:], 0.0, True, scale=scale)  # in q's layout
    lse1 = lse1.reshape(n, hq, L)  # (log-sum-exps: 1 / head_dim of an output; a copy is cheap)
    m = torch.maximum(lse1, lse2)
    w1, w2 = lse1.sub_(m).exp_()[..., None], lse2.sub_(m).exp_()[..., None]  # (n, hq, L, 1) fp32, in place
    # merged into o2 (fp32: in place), which keeps q's layout, so the caller's transpose back is a view
    o = o2.float().mul_(w2).add_(o1.view(n, hq, L, e).float().mul_(w1)).div_(w1 + w2)
    return o.to(q.dtype)
