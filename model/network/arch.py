"""Granite 4.0 H architecture numbers, read from a checkpoint's config.json through transformers'
GraniteMoeHybridConfig (both layer-type spellings: linear_attention/mamba, full_attention/attention)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MAMBA_KINDS = ("mamba", "linear_attention")
ATTENTION_KINDS = ("attention", "full_attention")


@dataclass(frozen=True)
class GraniteArch:
    vocab_size: int
    hidden: int
    kinds: tuple[str, ...]  # per layer: "mamba" | "attention"
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_inner: int
    rms_eps: float
    embedding_multiplier: float
    residual_multiplier: float
    attention_multiplier: float  # the attention scale itself (1/head_dim in Granite 4), not 1/sqrt
    logits_scaling: float
    tie_embeddings: bool
    attention_bias: bool
    m_heads: int
    m_head_dim: int
    m_state: int
    m_groups: int
    m_conv: int
    m_chunk: int
    m_conv_bias: bool
    m_proj_bias: bool
    dt_limit: tuple[float, float]

    @property
    def m_inner(self) -> int:
        return self.m_heads * self.m_head_dim

    @property
    def conv_dim(self) -> int:
        return self.m_inner + 2 * self.m_groups * self.m_state

    @property
    def n_mamba(self) -> int:
        return self.kinds.count("mamba")

    @property
    def n_attention(self) -> int:
        return self.kinds.count("attention")

    @classmethod
    def from_hf_config(cls, cfg) -> GraniteArch:
        if getattr(cfg, "num_local_experts", 0):
            raise ValueError("mixture-of-experts Granite checkpoints (num_local_experts > 0) are not supported")
        pos = getattr(cfg, "position_embedding_type", None)
        if pos not in (None, "nope"):
            raise ValueError(f"position_embedding_type={pos!r} is not supported (Granite 4.0 H uses none)")
        kinds = []
        for i, t in enumerate(cfg.layer_types):
            if t not in MAMBA_KINDS + ATTENTION_KINDS:
                raise ValueError(f"layer {i}: unknown layer type {t!r}")
            kinds.append("mamba" if t in MAMBA_KINDS else "attention")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        limit = tuple(float(v) for v in (cfg.time_step_limit or (0.0, float("inf"))))
        return cls(
            vocab_size=cfg.vocab_size, hidden=cfg.hidden_size, kinds=tuple(kinds),
            n_heads=cfg.num_attention_heads, n_kv_heads=cfg.num_key_value_heads, head_dim=head_dim,
            mlp_inner=cfg.shared_intermediate_size, rms_eps=cfg.rms_norm_eps,
            embedding_multiplier=float(cfg.embedding_multiplier), residual_multiplier=float(cfg.residual_multiplier),
            attention_multiplier=float(cfg.attention_multiplier), logits_scaling=float(cfg.logits_scaling),
            tie_embeddings=bool(cfg.tie_word_embeddings), attention_bias=bool(cfg.attention_bias),
            m_heads=cfg.mamba_n_heads, m_head_dim=int(cfg.mamba_d_head), m_state=cfg.mamba_d_state,
            m_groups=cfg.mamba_n_groups, m_conv=cfg.mamba_d_conv, m_chunk=cfg.mamba_chunk_size,
            m_conv_bias=bool(cfg.mamba_conv_bias), m_proj_bias=bool(cfg.mamba_proj_bias), dt_limit=limit,
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> GraniteArch:
        from transformers import GraniteMoeHybridConfig

        return cls.from_hf_config(GraniteMoeHybridConfig.from_pretrained(str(model_dir)))
