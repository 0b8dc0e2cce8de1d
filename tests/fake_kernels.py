"""CPU stand-ins for the fused kernels with the real signatures and the real argument checks.

Each mirrors mamba_ssm 2.3 / causal-conv1d 1.6 (mamba_chunk_scan_combined, selective_state_update,
causal_conv1d_fn, causal_conv1d_update): same parameter names and order, the same asserts on shapes,
dtypes and strides, and an independent computation (token-by-token recurrence, explicit loops), so a wrong
argument order, layout or index dtype in model/kernels.py fails here on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.kernels import FusedOps

calls: dict[str, int] = {}


def _count(name):
    calls[name] = calls.get(name, 0) + 1


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, return_varlen_states=False, state_dtype=None):
    _count("mamba_chunk_scan_combined")
    batch, seqlen, nheads, headdim = x.shape
    _, _, ngroups, dstate = B.shape
    assert nheads % ngroups == 0
    assert B.shape == (batch, seqlen, ngroups, dstate) and C.shape == B.shape
    assert dt.shape == (batch, seqlen, nheads)
    assert A.shape == (nheads,) and isinstance(chunk_size, int)
    assert D is None or D.shape in ((nheads, headdim), (nheads,))
    assert dt_bias is None or dt_bias.shape == (nheads,)
    assert initial_states is None or initial_states.shape == (batch, nheads, headdim, dstate)
    assert len(dt_limit) == 2
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0)
    dt = F.softplus(dt) if dt_softplus else dt
    dt = dt.clamp(dt_limit[0], dt_limit[1])
    rep = nheads // ngroups
    state = (initial_states.float().clone() if initial_states is not None
             else torch.zeros(batch, nheads, headdim, dstate))
    out = torch.empty(batch, seqlen, nheads, headdim)
    for t in range(seqlen):
        for hh in range(nheads):
            g = hh // rep
            dA = torch.exp(dt[:, t, hh] * A[hh].float())  # (batch,)
            state[:, hh] = state[:, hh] * dA[:, None, None] + (dt[:, t, hh, None] * x[:, t, hh].float())[
                :, :, None] * B[:, t, g].float()[:, None, :]
            out[:, t, hh] = torch.einsum("bpn,bn->bp", state[:, hh], C[:, t, g].float())
    if D is not None:
        Dv = D.float() if D.dim() == 2 else D.float()[:, None]
        out = out + x.float() * Dv
    out = out.to(x.dtype)
    if return_final_states:
        return out, state.to(state_dtype if state_dtype is not None else C.dtype)
    return out


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    _count("selective_state_update")
    _, nheads, dim, dstate = state.shape
    batch = x.shape[0]
    assert x.shape == (batch, nheads, dim) and dt.shape == x.shape
    assert A.shape == (nheads, dim, dstate)
    ngroups = B.shape[1]
    assert nheads % ngroups == 0 and B.shape == (batch, ngroups, dstate) and C.shape == B.shape
    assert D is None or D.shape == (nheads, dim)
    assert z is None or z.shape == x.shape
    assert dt_bias is None or dt_bias.shape == (nheads, dim)
    if state_batch_indices is not None:
        assert state_batch_indices.shape == (batch,) and state_batch_indices.dtype == torch.int32
    else:
        assert state.shape[0] == batch
    _tie = A.stride(-1) == 0 and A.stride(-2) == 0 and dt.stride(-1) == 0 and dt_bias.stride(-1) == 0  # noqa: F841
    rep = nheads // ngroups
    out = torch.empty(batch, nheads, dim)
    for b in range(batch):
        s = int(state_batch_indices[b]) if state_batch_indices is not None else b
        for hh in range(nheads):
            d = dt[b, hh].float() + (dt_bias[hh].float() if dt_bias is not None else 0)  # (dim,)
            d = torch.log1p(torch.exp(d)) if dt_softplus else d
            dA = torch.exp(A[hh].float() * d[:, None])  # (dim, dstate)
            st = state[s, hh].float() * dA + (d * x[b, hh].float())[:, None] * B[b, hh // rep].float()[None]
            state[s, hh] = st.to(state.dtype)
            o = st @ C[b, hh // rep].float()
            if D is not None:
                o = o + x[b, hh].float() * D[hh].float()
            out[b, hh] = o
    return out.to(x.dtype)


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    _count("causal_conv1d_fn")
    assert activation in (None, "silu", "swish")
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    assert weight.shape == (dim, width) and weight.stride(-1) == 1
    assert bias is None or bias.shape == (dim,)
    assert x.stride(2) == 1 or x.stride(1) == 1
    assert initial_states is None or x.stride(1) == 1  # initial states need channel-last x
    xf = F.pad(x.float(), (width - 1, 0))
    out = torch.zeros(batch, dim, seqlen)
    for k in range(width):
        out += weight[:, k].float()[None, :, None] * xf[..., k:k + seqlen]
    if bias is not None:
        out += bias.float()[None, :, None]
    out = F.silu(out) if activation else out
    return out.to(x.dtype)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    _count("causal_conv1d_update")
    assert activation in (None, "silu", "swish") and cache_seqlens is None
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    state_len = conv_state.shape[-1]
    assert state_len >= width - 1 and conv_state.shape[1] == dim and weight.shape == (dim, width)
    assert conv_state.dtype == x.dtype
    if conv_state_indices is not None:
        assert conv_state_indices.shape == (batch,) and conv_state_indices.dtype == torch.int32
        idx = conv_state_indices.long()
    else:
        assert conv_state.shape[0] == batch
        idx = torch.arange(batch)
    xx = torch.cat([conv_state[idx], x], dim=-1)  # (batch, dim, state_len + seqlen)
    conv_state[idx] = xx[..., -state_len:]
    out = F.conv1d(xx.float(), weight.float().unsqueeze(1), bias.float() if bias is not None else None,
                   groups=dim)[..., -seqlen:]
    out = F.silu(out) if activation else out
    out = out.to(x.dtype)
    return out.squeeze(-1) if squeeze else out


def fake_ops(**drop) -> FusedOps:
    ops = FusedOps(mamba_chunk_scan_combined, selective_state_update, causal_conv1d_fn, causal_conv1d_update, {})
    for name in drop:
        setattr(ops, name, None)
    return ops
