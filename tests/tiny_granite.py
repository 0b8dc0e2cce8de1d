"""Tiny random Granite 4.0 H checkpoints for NET's tests (HF config + weights, safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch

KINDS = ("linear_attention", "full_attention", "linear_attention", "linear_attention")


def tiny_config(**overrides):
    from transformers import GraniteMoeHybridConfig

    kw = dict(
        vocab_size=320, hidden_size=32, num_hidden_layers=len(KINDS), layer_types=list(KINDS),
        num_attention_heads=4, num_key_value_heads=2, shared_intermediate_size=48, num_local_experts=0,
        mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_d_conv=4,
        mamba_chunk_size=8, mamba_expand=2, position_embedding_type="nope", tie_word_embeddings=True,
        embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.125, logits_scaling=2.0,
        rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=512,
    )
    kw.update(overrides)
    kw["num_hidden_layers"] = len(kw["layer_types"])
    return GraniteMoeHybridConfig(**kw)


def build_tiny(out_dir: Path, seed: int = 0, **overrides):
    """Save a random tiny GraniteMoeHybridForCausalLM to out_dir; returns the HF model (fp32, eval)."""
    from transformers import GraniteMoeHybridForCausalLM

    torch.manual_seed(seed)
    model = GraniteMoeHybridForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # make the Mamba dynamics non-trivial (HF init sets A=1..h, D=1, dt_bias=1)
        for layer in model.model.layers:
            if layer.mamba is not None:
                m = layer.mamba
                m.A_log.copy_(torch.rand_like(m.A_log) * 1.5 - 0.5)
                m.D.copy_(torch.randn_like(m.D))
                m.dt_bias.copy_(torch.randn_like(m.dt_bias) * 0.5)
                m.conv1d.bias.copy_(torch.randn_like(m.conv1d.bias) * 0.1)
                m.norm.weight.copy_(1 + 0.1 * torch.randn_like(m.norm.weight))
            layer.input_layernorm.weight.add_(0.1 * torch.randn_like(layer.input_layernorm.weight))
    model.save_pretrained(out_dir)
    return model
