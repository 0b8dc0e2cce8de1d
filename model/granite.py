"""Granite 4.0 H (GraniteMoeHybridForCausalLM, dense MLP) with serving-style prefill and decode.

Parameter names equal the Hugging Face checkpoint's, so safetensors load straight into a model built on
the meta device (assign=True: nothing initialised twice). All sequence state lives in a StatePool
(model/state.py); the network only reads and writes it by slot (Mamba) or KV block (attention):
  prefill: the chunks of several sequences packed in one forward (model/packed.py), each continuing
           from its slot's state and existing KV
  decode:  one token for each of B sequences, states updated in place by slot index
Every op that has a fused CUDA kernel goes through a Kernels object (model/kernels.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.arch import GraniteArch
from model.decode_batch import Decode
from model.packed import Packed

__all__ = ["GraniteArch", "GraniteForCausalLM", "load_granite", "FP32_PARAMS"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one fused op, the same formula
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """RMSNorm(y * silu(gate)) per group of channels (n_groups groups), in float32."""

    def __init__(self, dim: int, eps: float, groups: int) -> None:
        super().__init__(dim, eps)
        self.groups = groups

    def forward(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        yf = y.float() * F.silu(gate.float())
        yg = yf.unflatten(-1, (self.groups, -1))
        yg = F.rms_norm(yg, (yg.shape[-1],), None, self.eps)  # x * rsqrt(mean(x^2) + eps) per group, fp32
        return self.weight * yg.flatten(-2).to(y.dtype)


class MLP(nn.Module):
    def __init__(self, a: GraniteArch) -> None:
        super().__init__()
        self.input_linear = nn.Linear(a.hidden, 2 * a.mlp_inner, bias=False)
        self.output_linear = nn.Linear(a.mlp_inner, a.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.input_linear(x).chunk(2, dim=-1)
        return self.output_linear(F.silu(gate) * up)


class MambaMixer(nn.Module):
    def __init__(self, a: GraniteArch) -> None:
        super().__init__()
        self.a = a
        self.in_proj = nn.Linear(a.hidden, a.m_inner + a.conv_dim + a.m_heads, bias=a.m_proj_bias)
        self.conv1d = nn.Conv1d(a.conv_dim, a.conv_dim, a.m_conv, groups=a.conv_dim, bias=a.m_conv_bias,
                                padding=a.m_conv - 1)
        self.dt_bias = nn.Parameter(torch.empty(a.m_heads))
        self.A_log = nn.Parameter(torch.empty(a.m_heads))
        self.D = nn.Parameter(torch.empty(a.m_heads))
        self.norm = GatedRMSNorm(a.m_inner, a.rms_eps, a.m_groups)
        self.out_proj = nn.Linear(a.m_inner, a.hidden, bias=a.m_proj_bias)

    def _split_xbc(self, xbc: torch.Tensor):
        a = self.a
        x, B, C = xbc.split([a.m_inner, a.m_groups * a.m_state, a.m_groups * a.m_state], dim=-1)
        return (x.unflatten(-1, (a.m_heads, a.m_head_dim)), B.unflatten(-1, (a.m_groups, a.m_state)),
                C.unflatten(-1, (a.m_groups, a.m_state)))

    def prefill(self, h, pk: Packed, conv_pool, ssm_pool, K):
        """h (T, hidden) packed tokens of pk's sequences; pools (S, ...) read and written at pk.slots."""
        a = self.a
        gate, xbc, dt = self.in_proj(h).split([a.m_inner, a.conv_dim, a.m_heads], dim=-1)
        xbc, new_conv = K.conv_prefill(pk.pad(xbc).transpose(1, 2), conv_pool[pk.slots],
                                       self.conv1d.weight.squeeze(1), self.conv1d.bias, pk.lengths)  # (b, d, L)
        conv_pool.index_copy_(0, pk.slots, new_conv.to(conv_pool.dtype))
        x, B, C = self._split_xbc(xbc.transpose(1, 2))  # (b, L, ...)
        A = -torch.exp(self.A_log.float())
        y, final = K.ssd_prefill(x, pk.pad(dt), A, B, C, a.m_chunk, self.D, self.dt_bias, ssm_pool[pk.slots],
                                 a.dt_limit, pk.lengths)
        ssm_pool.index_copy_(0, pk.slots, final.to(ssm_pool.dtype))
        return self.out_proj(self.norm(pk.unpad(y.flatten(-2)), gate).to(h.dtype))  # (T, hidden)

    def decode(self, h, conv_pool, ssm_pool, slots, K):
        """h (B, hidden); pools (S, ...) updated in place at slots: (B,) long, or a slice of consecutive slots."""
        a = self.a
        gate, xbc, dt = self.in_proj(h).split([a.m_inner, a.conv_dim, a.m_heads], dim=-1)
        xbc = K.conv_decode(xbc, conv_pool, slots, self.conv1d.weight.squeeze(1), self.conv1d.bias)
        x, B, C = self._split_xbc(xbc)
        A = -torch.exp(self.A_log.float())
        y = K.ssm_decode(ssm_pool, slots, x, dt, A, B, C, self.D, self.dt_bias, a.dt_limit)
        return self.out_proj(self.norm(y.flatten(-2), gate).to(h.dtype))


class Attention(nn.Module):
    """GQA attention, no positional encoding; KV lives in paged blocks (NB, block_size, kv_heads, head_dim)."""

    def __init__(self, a: GraniteArch) -> None:
        super().__init__()
        self.a = a
        self.q_proj = nn.Linear(a.hidden, a.n_heads * a.head_dim, bias=a.attention_bias)
        self.k_proj = nn.Linear(a.hidden, a.n_kv_heads * a.head_dim, bias=a.attention_bias)
        self.v_proj = nn.Linear(a.hidden, a.n_kv_heads * a.head_dim, bias=a.attention_bias)
        self.o_proj = nn.Linear(a.n_heads * a.head_dim, a.hidden, bias=a.attention_bias)

    def _qkv(self, h):
        e = self.a.head_dim
        return (self.q_proj(h).unflatten(-1, (-1, e)), self.k_proj(h).unflatten(-1, (-1, e)),
                self.v_proj(h).unflatten(-1, (-1, e)))

    def prefill(self, h, pk: Packed, k_cache, v_cache, K):
        """h (T, hidden) packed; new KV written at pk.kv_write, each sequence's keys read from pk.kv_blocks."""
        q, k, v = self._qkv(h)  # (T, heads, e)
        kf, vf = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
        kf.index_copy_(0, pk.kv_write, k.to(kf.dtype))
        vf.index_copy_(0, pk.kv_write, v.to(vf.dtype))
        keys = k_cache[pk.kv_blocks].flatten(1, 2).to(q.dtype)  # (b, Tk = nb * bs, kv_heads, e)
        vals = v_cache[pk.kv_blocks].flatten(1, 2).to(q.dtype)
        o = K.attention(pk.pad(q).transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2), pk.mask,
                        self.a.attention_multiplier)  # (b, heads, L, e)
        return self.o_proj(pk.unpad(o.transpose(1, 2).flatten(-2)))  # (T, hidden)

    def decode(self, h, k_cache, v_cache, block_tables, positions, K):
        """h (B, hidden); block_tables (B, mb) long; positions (B,) = tokens already cached per sequence."""
        bs = k_cache.shape[1]
        q, k, v = self._qkv(h)  # (B, heads, e)
        kf, vf = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
        new = block_tables.gather(1, (positions // bs)[:, None])[:, 0] * bs + positions % bs
        kf.index_copy_(0, new, k.to(kf.dtype))
        vf.index_copy_(0, new, v.to(vf.dtype))
        # whole blocks (bs * kv_heads * e contiguous values each), not single rows: one wide gather
        keys = k_cache[block_tables].flatten(1, 2).to(q.dtype)  # (B, T = mb * bs, kv_heads, e)
        vals = v_cache[block_tables].flatten(1, 2).to(q.dtype)
        mask = torch.arange(keys.shape[1], device=h.device)[None, :] <= positions[:, None]  # (B, T)
        o = K.attention(q[:, :, None], keys.transpose(1, 2), vals.transpose(1, 2), mask[:, None, None],
                        self.a.attention_multiplier)  # (B, heads, 1, e)
        return self.o_proj(o[:, :, 0].flatten(-2))


class DecoderLayer(nn.Module):
    def __init__(self, a: GraniteArch, kind: str, kind_index: int) -> None:
        super().__init__()
        self.kind, self.kind_index, self.res = kind, kind_index, a.residual_multiplier
        self.input_layernorm = RMSNorm(a.hidden, a.rms_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden, a.rms_eps)
        if kind == "mamba":
            self.mamba = MambaMixer(a)
        else:
            self.self_attn = Attention(a)
        self.shared_mlp = MLP(a)

    def _mlp(self, h):
        return h + self.shared_mlp(self.post_attention_layernorm(h)) * self.res

    def prefill(self, h, pk, state, K):
        x, i = self.input_layernorm(h), self.kind_index
        if self.kind == "mamba":
            y = self.mamba.prefill(x, pk, state.conv[i], state.ssm[i], K)
        else:
            y = self.self_attn.prefill(x, pk, state.k[i], state.v[i], K)
        return self._mlp(h + y * self.res)

    def decode(self, h, slots, block_tables, positions, state, K):
        x, i = self.input_layernorm(h), self.kind_index
        if self.kind == "mamba":
            y = self.mamba.decode(x, state.conv[i], state.ssm[i], slots, K)
        else:
            y = self.self_attn.decode(x, state.k[i], state.v[i], block_tables, positions, K)
        return self._mlp(h + y * self.res)


class Backbone(nn.Module):
    def __init__(self, a: GraniteArch) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden)
        counts = {"mamba": 0, "attention": 0}
        layers = []
        for kind in a.kinds:
            layers.append(DecoderLayer(a, kind, counts[kind]))
            counts[kind] += 1
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(a.hidden, a.rms_eps)


class GraniteForCausalLM(nn.Module):
    def __init__(self, a: GraniteArch) -> None:
        super().__init__()
        self.arch = a
        self.model = Backbone(a)
        self.lm_head = None if a.tie_embeddings else nn.Linear(a.hidden, a.vocab_size, bias=False)
        self.state = self.K = None  # see bind()

    def _embed(self, ids):
        return self.model.embed_tokens(ids) * self.arch.embedding_multiplier

    def bind(self, state, kernels) -> None:
        """The state pool (model/state.py) and kernels (model/kernels.py) every forward uses, set once."""
        self.state, self.K = state, kernels

    @torch.no_grad()
    def prefill_packed(self, ids, pk: Packed) -> torch.Tensor:
        """ids (T,): the chunks of pk's sequences back to back -> final-normed hidden states (T, hidden)."""
        h = self._embed(ids)
        for layer in self.model.layers:
            h = layer.prefill(h, pk, self.state, self.K)
        return self.model.norm(h)

    def prefill(self, ids, slot: int, start: int, block_table) -> torch.Tensor:
        """ids (l,) of one sequence continuing from `start` -> final-normed hidden states (l, hidden)."""
        pk = Packed.build([slot], [start], [len(ids)], [block_table], self.state.block_size,
                          self.state.dummy_block, ids.device)
        return self.prefill_packed(ids, pk)

    @torch.no_grad()
    def decode(self, d: Decode) -> torch.Tensor:
        """One token for each of d's B rows -> final-normed hidden states (B, hidden)."""
        h = self._embed(d.ids)
        for layer in self.model.layers:
            h = layer.decode(h, d.slots, d.block_tables, d.positions, self.state, self.K)
        return self.model.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return (F.linear(h, w) / self.arch.logits_scaling).float()


# Mamba parameters used in float32 whatever the model dtype (tiny; the scan discretizes in fp32).
FP32_PARAMS = ("A_log", "D", "dt_bias")


def load_granite(model_dir: str | Path, device: torch.device | str, dtype: torch.dtype) -> GraniteForCausalLM:
    """Build on the meta device and assign the checkpoint's tensors (safetensors, memory-mapped)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    arch = GraniteArch.from_dir(model_dir)
    with torch.device("meta"):
        model = GraniteForCausalLM(arch)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    expected = set(model.state_dict())
    sd = {}
    for path in files:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():
                if name == "lm_head.weight" and arch.tie_embeddings:
                    continue  # tied: the embedding is the head
                if name not in expected:
                    raise ValueError(f"unexpected tensor {name!r} in {path.name}")
                t = f.get_tensor(name)
                want = torch.float32 if name.rsplit(".", 1)[-1] in FP32_PARAMS else dtype
                sd[name] = t.to(want) if t.is_floating_point() else t
    missing = expected - set(sd)
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)
