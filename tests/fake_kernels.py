"""CPU stand-ins for the fused kernels with the real signatures, the real checks and the real outputs.

Each mirrors mamba-ssm 2.3.2.post1 / causal-conv1d 1.6.2.post1 as published (read from the sources:
mamba_ssm/ops/triton/{ssd_combined,selective_state_update}.py, causal_conv1d/causal_conv1d_interface.py
and csrc/causal_conv1d.cpp): the same parameter names and order (no `state_dtype`: 2.3.2.post1 has none),
the same asserts and TORCH_CHECKs on shapes, dtypes and strides, the same crashes (D=None or dt_bias=None
in selective_state_update), the same output dtypes (SSD final states in fp32), and an independent
computation (token-by-token recurrence, explicit loops). A wrong argument order, layout, index dtype or
an assumption the real kernel does not honour fails here on CPU. The mamba-ssm kernels themselves run on
CPU under Triton's interpreter in tests/triton; causal-conv1d is CUDA C++ and only has this stand-in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.network.fused_ops import FusedOps

calls: dict[str, int] = {}


def _count(name):
    calls[name] = calls.get(name, 0) + 1


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, return_varlen_states=False):
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
    assert seq_idx is None or seq_idx.shape == (batch, seqlen)
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
    if return_final_states:  # _state_passing_fwd allocates final_states in float32
        return out, state.float()
    return out


def _launch(*args):
    return args


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
    assert state_batch_indices is None or state_batch_indices.shape == (batch,)  # any integer dtype
    # The kernel launch's argument list, as upstream writes it: `*0` for a missing D or dt_bias raises
    # TypeError (and tie_hdim reads dt_bias.stride() when A and dt are tied).
    _tie = A.stride(-1) == 0 and A.stride(-2) == 0 and dt.stride(-1) == 0 and dt_bias.stride(-1) == 0  # noqa: F841
    _launch(*(dt_bias.stride(0), dt_bias.stride(1)) if dt_bias is not None else 0,
            *(D.stride(0), D.stride(1)) if D is not None else 0)
    rep = nheads // ngroups
    out = torch.zeros(batch, nheads, dim)
    for b in range(batch):
        s = int(state_batch_indices[b]) if state_batch_indices is not None else b
        if s < 0:  # "Skip padding tokens": output 0, no state touched
            continue
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


FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check_conv_common(x, weight, bias):
    """TORCH_CHECKs shared by causal_conv1d_fwd and causal_conv1d_update (csrc/causal_conv1d.cpp)."""
    assert x.dtype in FLOATS and weight.dtype in FLOATS
    dim, width = weight.shape
    assert 2 <= width <= 4, "causal_conv1d only supports width between 2 and 4"
    if bias is not None:
        assert bias.dtype == weight.dtype, "bias dtype must equal weight dtype"
        assert bias.stride(-1) == 1 and bias.shape == (dim,)


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    _count("causal_conv1d_fn")
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError("activation must be None, silu, or swish")
    if x.stride(2) != 1 and x.stride(1) != 1:  # the Python wrapper copies any other layout
        x = x.contiguous()
    bias = bias.contiguous() if bias is not None else None
    assert not return_final_states and final_states_out is None and seq_idx is None  # not used by us
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    assert weight.shape == (dim, width)
    _check_conv_common(x, weight, bias)
    channel_last = x.stride(1) == 1 and x.stride(2) > 1
    if channel_last:
        assert dim % 8 == 0 and x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0
    if initial_states is not None:
        assert channel_last, "initial_states is only supported for channel last layout"
        assert initial_states.dtype == x.dtype and initial_states.shape == (batch, dim, width - 1)
        assert initial_states.stride(1) == 1
    xf = (torch.cat([initial_states.float(), x.float()], -1) if initial_states is not None
          else F.pad(x.float(), (width - 1, 0)))
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
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError("activation must be None, silu, or swish")
    assert cache_seqlens is None  # the circular-buffer mode is not used by us
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    state_len = conv_state.shape[-1]
    assert conv_state.dtype == x.dtype, "conv_state dtype must equal the input dtype"
    assert state_len >= width - 1 and weight.shape == (dim, width)
    _check_conv_common(x, weight, bias)
    if conv_state_indices is not None:
        assert conv_state_indices.dtype == torch.int32 and conv_state_indices.stride(0) == 1
        assert conv_state_indices.shape == (batch,) and conv_state.shape[1:] == (dim, state_len)
        idx = conv_state_indices.long()
    else:
        assert conv_state.shape == (batch, dim, state_len)
        idx = torch.arange(batch)
    out = torch.zeros(batch, dim, seqlen, dtype=x.dtype)
    real = (idx >= 0).nonzero()[:, 0]  # "Skip padding tokens": negative index -> output 0, no state touched
    idx = idx[real]
    xx = torch.cat([conv_state[idx], x[real]], dim=-1)  # (rows, dim, state_len + seqlen)
    conv_state[idx] = xx[..., -state_len:]
    y = F.conv1d(xx.float(), weight.float().unsqueeze(1), bias.float() if bias is not None else None,
                 groups=dim)[..., -seqlen:]
    out[real] = (F.silu(y) if activation else y).to(x.dtype)
    return out.squeeze(-1) if squeeze else out


def fake_ops(**drop) -> FusedOps:
    ops = FusedOps(mamba_chunk_scan_combined, selective_state_update, causal_conv1d_fn, causal_conv1d_update, {})
    for name in drop:
        setattr(ops, name, None)
    return ops
