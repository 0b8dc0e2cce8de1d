"""Readable pure-torch reference ops for the Mamba-2 mixer (the CPU path, and the oracle for kernels).

Shapes (b = batch, l = tokens, h = heads, p = head dim, g = groups, n = state size, d = conv channels,
w = conv width):
  x (b, l, h, p); dt (b, l, h); A (h,) negative; B, C (b, l, g, n); D (h,); dt_bias (h,)
  SSM state (b, h, p, n); conv state (b, d, w - 1) = the last w - 1 conv inputs, oldest first.
All SSM arithmetic runs in float32; outputs are cast back to x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NO_DT_LIMIT = (0.0, float("inf"))


def discretize_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_limit=NO_DT_LIMIT) -> torch.Tensor:
    """softplus(dt + dt_bias) clamped to dt_limit, float32."""
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    dt = F.softplus(dt)
    if tuple(dt_limit) != NO_DT_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def ssd_chunk_scan(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None, dt_limit=NO_DT_LIMIT,
                   lengths=None):
    """Chunked SSD scan (the Mamba-2 paper's algorithm). Returns (y (b, l, h, p), final state (b, h, p, n) fp32).

    lengths (b,) long: row i holds lengths[i] real tokens then pads; pads get dt = 0 (no decay, no input),
    so its final state is the state after its last real token (its y at pads is meaningless).

    1. intra-chunk outputs (a masked "attention" C B^T inside each chunk),
    2. each chunk's own end state, 3. a recurrence over chunk end states from `initial_states`,
    4. the contribution of each chunk's start state to its outputs.
    """
    b, seqlen, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    dt = discretize_dt(dt, dt_bias, dt_limit)  # (b, l, h)
    if lengths is not None:
        dt = dt * (torch.arange(seqlen, device=x.device)[None, :] < lengths[:, None])[..., None]
    xf = x.float()
    r = h // g  # heads per group: B and C are shared by the r heads of a group, never repeated
    pad = (-seqlen) % chunk_size
    xdt = F.pad(xf * dt[..., None], (0, 0, 0, 0, 0, pad))  # (b, L, h, p); padded steps: zero input, no decay
    Adt = F.pad(A.float()[None, None] * dt, (0, 0, 0, pad))  # (b, L, h)
    Bc = F.pad(B.float(), (0, 0, 0, 0, 0, pad))  # (b, L, g, n)
    Cc = F.pad(C.float(), (0, 0, 0, 0, 0, pad))
    nc = (seqlen + pad) // chunk_size
    # Matmul layouts, c = chunk, s (or l) = position inside the chunk, heads split as (g, r):
    xdt = xdt.reshape(b, nc, chunk_size, g, r, p).permute(0, 1, 3, 4, 2, 5)  # (b, c, g, r, s, p)
    Bc, Cc = (t.reshape(b, nc, chunk_size, g, n).transpose(2, 3) for t in (Bc, Cc))  # (b, c, g, s, n)
    Adt = Adt.reshape(b, nc, chunk_size, g, r).permute(0, 1, 3, 4, 2)  # (b, c, g, r, s)
    A_cum = torch.cumsum(Adt, dim=-1)

    # 1. intra-chunk: y_diag[l] = sum_{s <= l} (C_l . B_s) exp(sum Adt(s, l]) xdt_s
    # The decay exp(A_cum[l] - A_cum[s]) as a difference of cumulative sums, as the fused kernel computes
    # it (a segment-sum form costs two more passes over (l, s)); in place, -inf above the diagonal.
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    L = (A_cum[..., :, None] - A_cum[..., None, :]).masked_fill_(~causal, -torch.inf).exp_()  # (b, c, g, r, l, s)
    L.mul_((Cc @ Bc.transpose(-1, -2))[:, :, :, None])  # * C_l . B_s, computed once per group
    y_diag = L @ xdt  # (b, c, g, r, l, p)
    # 2. chunk end states: sum_s exp(sum Adt(s, end]) xdt_s B_s^T. A group's heads and channels fold into one
    # (r p) axis, so it is one GEMM per (b, c, g) and B is never repeated per head.
    decay_states = torch.exp(A_cum[..., -1:] - A_cum)  # (b, c, g, r, s)
    xd = (xdt * decay_states[..., None]).transpose(-1, -2).reshape(b, nc, g, r * p, chunk_size)
    states = (xd @ Bc).view(b, nc, g, r, p, n)  # (b, c, g, r, p, n)
    # 3. recurrence over chunks, in order (as the fused kernel's state passing): start[:, k] is the state
    # entering chunk k
    chunk_decay = torch.exp(A_cum[..., -1])[..., None, None]  # (b, c, g, r, 1, 1)
    s = (torch.zeros(b, g, r, p, n, device=x.device) if initial_states is None
         else initial_states.float().reshape(b, g, r, p, n))
    start = torch.empty_like(states)
    for k in range(nc):
        start[:, k] = s
        s = torch.addcmul(states[:, k], s, chunk_decay[:, k])
    final = s.reshape(b, h, p, n)
    # 4. state -> output: y_off[l] = exp(sum Adt[.., l]) C_l . chunk start state, (r p) folded again
    y_off = Cc @ start.view(b, nc, g, r * p, n).transpose(-1, -2)  # (b, c, g, l, r p)
    y_off = y_off.view(b, nc, g, chunk_size, r, p).transpose(3, 4) * torch.exp(A_cum)[..., None]  # (b, c, g, r, l, p)
    y = (y_diag + y_off).permute(0, 1, 4, 2, 3, 5).reshape(b, nc * chunk_size, h, p)[:, :seqlen]
    if D is not None:
        y = y + xf * D.float()[:, None]
    return y.to(x.dtype), final


def ssd_naive(x, dt, A, B, C, D=None, dt_bias=None, initial_states=None, dt_limit=NO_DT_LIMIT):
    """Token-by-token recurrence h_t = exp(dt A) h_{t-1} + dt B_t x_t, y_t = C_t h_t + D x_t (test oracle)."""
    b, seqlen, h, p = x.shape
    state = torch.zeros(b, h, p, B.shape[-1]) if initial_states is None else initial_states.float().clone()
    ys = []
    for t in range(seqlen):
        y, state = ssm_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D, dt_bias, dt_limit)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def ssm_step(state, x, dt, A, B, C, D=None, dt_bias=None, dt_limit=NO_DT_LIMIT):
    """One recurrent step. state (b, h, p, n); x (b, h, p); dt (b, h); B, C (b, g, n). Returns (y, new state fp32)."""
    h = x.shape[1]
    g = B.shape[1]
    dt = discretize_dt(dt, dt_bias, dt_limit)  # (b, h)
    Bh = B.float().repeat_interleave(h // g, dim=1)  # (b, h, n)
    Ch = C.float().repeat_interleave(h // g, dim=1)
    dA = torch.exp(dt * A.float())  # (b, h)
    new = state.float() * dA[..., None, None] + (dt[..., None] * x.float())[..., None] * Bh[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", new, Ch)
    if D is not None:
        y = y + x.float() * D.float()[:, None]
    return y.to(x.dtype), new


# Gathering a slot's state into a batch and scattering it back moves it 4 times; past this size per slot and
# layer (mid-size checkpoints and up: 1 MiB at 32 heads x 64 x 128 in fp32), a loop of in-place updates over
# runs of consecutive slots is cheaper (mid checkpoint, 8 scattered rows: 22 ms of copies per step).
RUNS_MIN_SLOT_BYTES = 256 << 10


def ssm_decode_inplace(state_pool, slots, x, dt, A, B, C, D=None, dt_bias=None, dt_limit=NO_DT_LIMIT, runs=()):
    """One step for B sequences whose states live at state_pool[slots] (updated in place). Returns y (B, h, p).

    slots: (B,) long, or a slice when the rows are a run of consecutive slots: then an fp32 pool is
    updated through a view, with no gather / scatter. runs: ((first slot, count), ...) covering the rows in
    order (host ints; the runner's), used for big fp32 states instead of gather + scatter. The same
    arithmetic as ssm_step, in place, with heads grouped as (g, h/g * p) so B and C broadcast per group
    instead of being repeated per head.
    """
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    dt = discretize_dt(dt, dt_bias, dt_limit)  # (b, h)
    dA = torch.exp(dt * A.float())[..., None, None]  # (b, h, 1, 1)
    dtx = (dt[..., None] * x.float()).reshape(b, g, -1, 1)  # (b, g, h/g * p, 1)
    Bf, Cf = B.float()[:, :, None, :], C.float()[:, :, :, None]  # (b, g, 1, n), (b, g, n, 1)
    fp32 = state_pool.dtype == torch.float32
    if isinstance(slots, slice) or not (runs and fp32 and state_pool[0].nbytes >= RUNS_MIN_SLOT_BYTES):
        runs = ((slots.start, b),) if isinstance(slots, slice) and fp32 else ()
    if runs:
        y = torch.empty(b, h, p, device=x.device)
        row = 0
        for first, count in runs:  # views of the pool: updated where they live
            rows = slice(row, row + count)
            sg = state_pool[first:first + count].mul_(dA[rows]).view(count, g, -1, n)
            sg.addcmul_(dtx[rows], Bf[rows])  # += dt x B^T per group
            y[rows] = torch.matmul(sg, Cf[rows]).view(count, h, p)
            row += count
    else:
        st = state_pool[slots].float()  # (b, h, p, n): a gathered copy
        st.mul_(dA)
        sg = st.view(b, g, (h // g) * p, n)
        sg.addcmul_(dtx, Bf)
        y = torch.matmul(sg, Cf).view(b, h, p)
        if isinstance(slots, slice):
            state_pool[slots] = st.to(state_pool.dtype)
        else:
            state_pool.index_copy_(0, slots, st.to(state_pool.dtype))
    if D is not None:
        y = y + x.float() * D.float()[:, None]
    return y.to(x.dtype)


def conv_state_at(xx, lengths, w):
    """xx (b, d, w-1+l) = [state, inputs]; the new conv state of row i ends at its lengths[i]-th input."""
    if lengths is None:
        return xx[..., xx.shape[-1] - (w - 1):]
    idx = lengths[:, None] + torch.arange(w - 1, device=xx.device)  # (b, w-1) columns of xx
    return xx.gather(2, idx[:, None, :].expand(-1, xx.shape[1], -1))


def causal_conv(x, conv_state, weight, bias=None, lengths=None):
    """Depthwise causal conv + SiLU continuing from conv_state.

    x (b, d, l); conv_state (b, d, w-1) or None (= zeros); weight (d, w); lengths (b,) long or None: row i
    has lengths[i] real inputs then pads (causal: pads never change a real output). Returns (y (b, d, l),
    new state).
    """
    w = weight.shape[-1]
    if conv_state is None:
        conv_state = x.new_zeros(x.shape[0], x.shape[1], w - 1)
    xx = torch.cat([conv_state.to(x.dtype), x], dim=-1)  # (b, d, w-1+l)
    y = F.conv1d(xx, weight.unsqueeze(1).to(x.dtype), bias, groups=x.shape[1])
    return F.silu(y), conv_state_at(xx, lengths, w)


def conv_decode_inplace(x, conv_pool, slots, weight, bias=None):
    """x (B, d): one new conv input per sequence; conv_pool (S, d, w-1) updated in place at slots ((B,) long,
    or a slice for a run of consecutive slots). Returns (B, d)."""
    window = torch.cat([conv_pool[slots].to(x.dtype), x[..., None]], dim=-1)  # (B, d, w)
    y = (window * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias
    if isinstance(slots, slice):
        conv_pool[slots] = window[..., 1:]
    else:
        conv_pool.index_copy_(0, slots, window[..., 1:].to(conv_pool.dtype))
    return F.silu(y)
