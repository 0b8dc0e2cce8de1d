"""Granite 4.0 H (GraniteMoeHybridForCausalLM, dense MLP) with serving-style prefill and decode.

Parameter names equal the Hugging Face checkpoint's, so safetensors load straight into a model built on
the meta device (assign=True: nothing initialised twice). All sequence state lives in a StatePool
(model/runtime/state.py); the network only reads and writes it by slot (Mamba) or KV block (attention):
  prefill: the chunks of several sequences packed in one forward (model/network/packed.py), each continuing
           from its slot's state and existing KV
  decode:  one token for each of B sequences, states updated in place by slot index
Every op that has a fused CUDA kernel goes through a Kernels object (model/network/kernels.py), the norms included:
each layer's residual add is fused into the RMSNorm that follows it (Kernels.add_norm), so the layers pass
(branch output, residual stream) along and the branch scale (embedding / residual multiplier) is applied
inside the next norm.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.network.arch import GraniteArch
from model.network.decode_batch import Decode
from model.network.kernels import gated_rms_norm
from model.network.linear import LinearExtra
from model.network.packed import Packed
from model.network.step_meta import DecodeMeta, SsmParams

__all__ = ["GraniteArch", "GraniteForCausalLM", "load_granite", "FP32_PARAMS"]


class RMSNorm(nn.Module):
    """The weight and eps of an RMSNorm; Kernels.add_norm applies it (model/network/kernels.py rms_norm: the formula)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


class GatedRMSNorm(RMSNorm):
    """RMSNorm(y * silu(gate)) per group of channels (n_groups groups), in float32 (Kernels.gated_norm)."""

    def __init__(self, dim: int, eps: float, groups: int) -> None:
        super().__init__(dim, eps)
        self.groups = groups

    def forward(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(y, gate, self.weight, self.eps, self.groups)


class Linear(nn.Linear):
    """nn.Linear through the kernels' linear (model/network/kernels.py: oneDNN's on CPU), set by bind(), plus an
    optional per-row extra term (model/network/kernels.py LinearExtra: where a LoRA delta goes)."""

    fn = staticmethod(F.linear)
    extra: LinearExtra | None = None  # none by default: the projection alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fn(x, self.weight, self.bias)
        return y if self.extra is None else self.extra(x, y)


class MLP(nn.Module):
    def __init__(self, a: GraniteArch) -> None:
        super().__init__()
        self.input_linear = Linear(a.hidden, 2 * a.mlp_inner, bias=False)
        self.output_linear = Linear(a.mlp_inner, a.hidden, bias=False)

    def forward(self, x: torch.Tensor, K) -> torch.Tensor:
        return self.output_linear(K.swiglu(self.input_linear(x)))  # [gate | up] -> silu(gate) * up


class MambaMixer(nn.Module):
    def __init__(self, a: GraniteArch) -> None:
        super().__init__()
        self.a = a
        self.in_proj = Linear(a.hidden, a.m_inner + a.conv_dim + a.m_heads, bias=a.m_proj_bias)
        self.conv1d = nn.Conv1d(a.conv_dim, a.conv_dim, a.m_conv, groups=a.conv_dim, bias=a.m_conv_bias,
                                padding=a.m_conv - 1)
        self.dt_bias = nn.Parameter(torch.empty(a.m_heads))
        self.A_log = nn.Parameter(torch.empty(a.m_heads))
        self.D = nn.Parameter(torch.empty(a.m_heads))
        self.norm = GatedRMSNorm(a.m_inner, a.rms_eps, a.m_groups)
        self.out_proj = Linear(a.m_inner, a.hidden, bias=a.m_proj_bias)
        self._ssm: tuple | None = None  # (Kernels, SsmParams), see ssm_params

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
                                 a.dt_limit, pk)  # y (T, h, p)
        ssm_pool.index_copy_(0, pk.slots, final.to(ssm_pool.dtype))
        return self.out_proj(self.norm(y.flatten(-2), gate).to(h.dtype))  # (T, hidden)

    def ssm_params(self, K) -> SsmParams:
        """The decode constants (A = -exp(A_log), kernel views), prepared once per Kernels object."""
        if self._ssm is None or self._ssm[0] is not K:
            self._ssm = (K, K.ssm_params(self.A_log, self.D, self.dt_bias, self.a.m_head_dim, self.a.m_state))
        return self._ssm[1]

    def decode(self, h, conv_pool, ssm_pool, meta: DecodeMeta, K):
        """h (B, hidden); pools (S, ...) updated in place at meta's slots."""
        a = self.a
        gate, xbc, dt = self.in_proj(h).split([a.m_inner, a.conv_dim, a.m_heads], dim=-1)
        xbc = K.conv_decode(xbc, conv_pool, meta.conv_slots, self.conv1d.weight.squeeze(1), self.conv1d.bias)
        x, B, C = self._split_xbc(xbc)
        P = self.ssm_params(K)
        y = K.ssm_decode(ssm_pool, meta.slots, x, dt, P.A, B, C, P.D, P.dt_bias, a.dt_limit, params=P, runs=meta.runs)
        return self.out_proj(K.gated_norm(y.flatten(-2), gate, self.norm.weight, self.norm.eps, self.norm.groups))


class Attention(nn.Module):
    """GQA attention, no positional encoding; KV lives in paged blocks (NB, block_size, kv_heads, head_dim)."""

    def __init__(self, a: GraniteArch) -> None:
        super().__init__()
        self.a = a
        self.q_proj = Linear(a.hidden, a.n_heads * a.head_dim, bias=a.attention_bias)
        self.k_proj = Linear(a.hidden, a.n_kv_heads * a.head_dim, bias=a.attention_bias)
        self.v_proj = Linear(a.hidden, a.n_kv_heads * a.head_dim, bias=a.attention_bias)
        self.o_proj = Linear(a.n_heads * a.head_dim, a.hidden, bias=a.attention_bias)

    def _qkv(self, h):
        e = self.a.head_dim
        return (self.q_proj(h).unflatten(-1, (-1, e)), self.k_proj(h).unflatten(-1, (-1, e)),
                self.v_proj(h).unflatten(-1, (-1, e)))

    def prefill(self, h, pk: Packed, k_cache, v_cache, K):
        """h (T, hidden) packed; new KV written at pk.kv_write, then each chunk attends to its sequence's keys
        [0, start + l] in place of a mask (model/network/prefill_attention.py)."""
        q, k, v = self._qkv(h)  # (T, heads, e)
        kf, vf = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
        kf.index_copy_(0, pk.kv_write, k.to(kf.dtype))
        vf.index_copy_(0, pk.kv_write, v.to(vf.dtype))
        o = K.prefill_attention(q, k_cache, v_cache, pk, self.a.attention_multiplier)  # (T, heads, e)
        return self.o_proj(o.flatten(-2))  # (T, hidden)

    def decode(self, h, k_cache, v_cache, meta: DecodeMeta, K):
        """h (B, hidden); this step's K/V are written at meta.kv_index, then each row attends to its own
        positions + 1 cached tokens."""
        q, k, v = self._qkv(h)  # (B, heads, e)
        kf, vf = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
        kf.index_copy_(0, meta.kv_index, k.to(kf.dtype))
        vf.index_copy_(0, meta.kv_index, v.to(vf.dtype))
        o = K.decode_attention(q, k_cache, v_cache, meta, self.a.attention_multiplier)  # (B, heads, e)
        return self.o_proj(o.flatten(-2))


class DecoderLayer(nn.Module):
    """norm -> mixer -> (+ residual) norm -> MLP; each `+ residual` is done by the norm after it (add_norm).

    prefill / decode take the previous branch's output y, the residual stream r (None before the first
    layer) and y's scale, and return (MLP output, r): the next layer (or the final norm) adds it.
    """

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

    def _norm_in(self, y, r, scale, K):
        n = self.input_layernorm
        return K.add_norm(y, r, n.weight, n.eps, scale)

    def _mlp(self, y, r, K):
        n = self.post_attention_layernorm
        x, r = K.add_norm(y, r, n.weight, n.eps, self.res)
        return self.shared_mlp(x, K), r

    def prefill(self, y, r, scale, pk, state, K):
        (x, r), i = self._norm_in(y, r, scale, K), self.kind_index
        if self.kind == "mamba":
            y = self.mamba.prefill(x, pk, state.conv[i], state.ssm[i], K)
        else:
            y = self.self_attn.prefill(x, pk, state.k[i], state.v[i], K)
        return self._mlp(y, r, K)

    def decode(self, y, r, scale, meta: DecodeMeta, state, K):
        (x, r), i = self._norm_in(y, r, scale, K), self.kind_index
        if self.kind == "mamba":
            y = self.mamba.decode(x, state.conv[i], state.ssm[i], meta, K)
        else:
            y = self.self_attn.decode(x, state.k[i], state.v[i], meta, K)
        return self._mlp(y, r, K)


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
        self.lm_head = None if a.tie_embeddings else Linear(a.hidden, a.vocab_size, bias=False)
        self.state = self.K = None  # see bind()

    def _layers(self, ids, run) -> torch.Tensor:
        """embedding -> layers (run(layer, y, r, scale)) -> final norm; the embedding multiplier and each
        branch's residual multiplier are applied inside the following norm."""
        a, norm = self.arch, self.model.norm
        y, r, scale = self.model.embed_tokens(ids), None, a.embedding_multiplier
        for layer in self.model.layers:
            y, r = run(layer, y, r, scale)
            scale = a.residual_multiplier
        return self.K.add_norm(y, r, norm.weight, norm.eps, scale)[0]

    def bind(self, state, kernels) -> None:
        """The state pool (model/runtime/state.py) and kernels (model/network/kernels.py) every forward uses, set once."""
        kernels.check_slots(state.conv)
        self.state, self.K = state, kernels
        for m in self.modules():
            if isinstance(m, Linear):
                m.fn = kernels.linear

    @torch.no_grad()
    def prefill_packed(self, ids, pk: Packed) -> torch.Tensor:
        """ids (T,): the chunks of pk's sequences back to back -> final-normed hidden states (T, hidden)."""
        return self._layers(ids, lambda layer, y, r, s: layer.prefill(y, r, s, pk, self.state, self.K))

    def prefill(self, ids, slot: int, start: int, block_table) -> torch.Tensor:
        """ids (l,) of one sequence continuing from `start` -> final-normed hidden states (l, hidden)."""
        pk = Packed.build([slot], [start], [len(ids)], [block_table], self.state.block_size,
                          self.state.dummy_block, ids.device)
        return self.prefill_packed(ids, pk)

    @torch.no_grad()
    def decode(self, d: Decode) -> torch.Tensor:
        """One token for each of d's B rows (slots: (B,) long or a slice of consecutive slots) ->
        final-normed hidden states (B, hidden)."""
        state, K = self.state, self.K
        meta = K.decode_meta(d.slots, d.block_tables, d.positions, state.block_size, d.runs)
        return self._layers(d.ids, lambda layer, y, r, s: layer.decode(y, r, s, meta, state, K))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        lin = F.linear if self.K is None else self.K.linear
        return (lin(h, w, None) / self.arch.logits_scaling).float()


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
