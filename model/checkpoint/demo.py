"""Deterministic Granite 4.0 H checkpoints with random weights: "tiny" for tests, "demo" for `make serve`.

The architecture is Granite 4.0 H micro scaled down (bench/micro_config.json is the full size): Mamba-2 layers with a
few attention layers, dense SwiGLU MLP (no experts), no positional encoding, tied embeddings, the Granite
multipliers. Weights come from a seeded torch.Generator, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from model.text.demo_tokenizer import ADDED_TOKENS, EOS, PAD, write_tokenizer

VERSION = "2"  # bump when presets or init change: demo_dir caches by preset + version

PRESETS: dict[str, dict] = {
    # Tests: 4 layers, attention at 1; GQA 4 q / 2 kv heads of 16; Mamba 8 heads x 16, d_state 16.
    "tiny": dict(
        vocab_size=512, hidden_size=64, num_hidden_layers=4, attention_layers=(1,), num_attention_heads=4,
        num_key_value_heads=2, mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=16,
        max_position_embeddings=4096,
    ),
    # `make serve`: 8 layers, attention at 2 and 6; GQA 8 q / 2 kv heads of 32; Mamba 8 heads x 64.
    "demo": dict(
        vocab_size=4096, hidden_size=256, num_hidden_layers=8, attention_layers=(2, 6), num_attention_heads=8,
        num_key_value_heads=2, mamba_n_heads=8, mamba_d_head=64, mamba_d_state=32, mamba_chunk_size=64,
        max_position_embeddings=16384,
    ),
}
# Init scales (see _init_weights): embedding std, and the target std of the output logits.
EMBED_STD = 0.02
LOGIT_STD = 3.0
OUT_GAIN = 3.0  # extra gain of the projections that write into the residual stream


def make_config(preset: str = "demo", **overrides) -> dict:
    """config.json contents. Overrides replace preset keys or any config.json field."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = {**PRESETS[preset], **overrides}
    hidden, n_layers = p["hidden_size"], p["num_hidden_layers"]
    attn = set(p.pop("attention_layers"))
    head_dim = hidden // p["num_attention_heads"]
    mlp = 4 * hidden  # Granite: 8192 / 2048
    vocab = p["vocab_size"]
    cfg = {
        "architectures": ["GraniteMoeHybridForCausalLM"],
        "model_type": "granitemoehybrid",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": mlp,
        "shared_intermediate_size": mlp,
        "num_local_experts": 0,
        "num_experts_per_tok": 0,
        "num_hidden_layers": n_layers,
        # The spelling of released Granite 4.0 H configs; transformers 5 reads it as
        # linear_attention / full_attention (override layer_types to test that spelling).
        "layer_types": ["attention" if i in attn else "mamba" for i in range(n_layers)],
        "num_attention_heads": p["num_attention_heads"],
        "num_key_value_heads": p["num_key_value_heads"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "position_embedding_type": "nope",
        "max_position_embeddings": p["max_position_embeddings"],
        "mamba_n_heads": p["mamba_n_heads"],
        "mamba_d_head": p["mamba_d_head"],
        "mamba_d_state": p["mamba_d_state"],
        "mamba_n_groups": 1,
        "mamba_d_conv": 4,
        "mamba_expand": 2,
        "mamba_chunk_size": p["mamba_chunk_size"],
        "mamba_conv_bias": True,
        "mamba_proj_bias": False,
        "embedding_multiplier": 12.0,
        "residual_multiplier": 0.22,
        "attention_multiplier": 1.0 / head_dim,
        "logits_scaling": 8.0,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": None,  # filled from the tokenizer
        "eos_token_id": None,
        "pad_token_id": None,
        "torch_dtype": "float32",
    }
    cfg.update({k: v for k, v in overrides.items() if k != "attention_layers"})  # any config.json field
    if p["mamba_n_heads"] * p["mamba_d_head"] != 2 * hidden:
        raise ValueError("mamba_n_heads * mamba_d_head must equal mamba_expand (2) * hidden_size")
    return cfg


def weight_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes as Hugging Face saves GraniteMoeHybridForCausalLM (lm_head tied, not saved)."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    nh, dh, ds = cfg["mamba_n_heads"], cfg["mamba_d_head"], cfg["mamba_d_state"]
    inner, groups = nh * dh, cfg["mamba_n_groups"]
    conv_dim = inner + 2 * groups * ds  # xBC channels
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i, kind in enumerate(cfg["layer_types"]):
        pre = f"model.layers.{i}."
        shapes[pre + "input_layernorm.weight"] = (h,)
        shapes[pre + "post_attention_layernorm.weight"] = (h,)
        shapes[pre + "shared_mlp.input_linear.weight"] = (2 * cfg["shared_intermediate_size"], h)
        shapes[pre + "shared_mlp.output_linear.weight"] = (h, cfg["shared_intermediate_size"])
        if kind in ("attention", "full_attention"):
            kv = cfg["num_key_value_heads"] * hd
            shapes[pre + "self_attn.q_proj.weight"] = (cfg["num_attention_heads"] * hd, h)
            shapes[pre + "self_attn.k_proj.weight"] = (kv, h)
            shapes[pre + "self_attn.v_proj.weight"] = (kv, h)
            shapes[pre + "self_attn.o_proj.weight"] = (h, cfg["num_attention_heads"] * hd)
        else:
            m = pre + "mamba."
            shapes[m + "in_proj.weight"] = (inner + conv_dim + nh, h)  # [gate | xBC | dt]
            shapes[m + "conv1d.weight"] = (conv_dim, 1, cfg["mamba_d_conv"])
            shapes[m + "conv1d.bias"] = (conv_dim,)
            shapes[m + "dt_bias"] = (nh,)
            shapes[m + "A_log"] = (nh,)
            shapes[m + "D"] = (nh,)
            shapes[m + "norm.weight"] = (inner,)
            shapes[m + "out_proj.weight"] = (h, inner)
    return shapes


_RESIDUAL_WRITERS = ("out_proj.weight", "o_proj.weight", "output_linear.weight")


def _init_weights(cfg: dict, seed: int):
    """Random weights, scaled so the mixers matter (context changes the next token) and logits are peaked.

    Linear layers: N(0, 1/fan_in) so each branch has roughly unit scale; embeddings N(0, EMBED_STD) so the
    residual stream (x12) starts near unit scale; the final norm weight is set so that tied logits
    (/ logits_scaling) have std ~LOGIT_STD instead of being nearly uniform. Mamba-2 dt/A follow the
    usual init (dt log-uniform in [1e-3, 1e-1], A = 1..n_heads).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    h = cfg["hidden_size"]
    out = {}
    for name, shape in weight_shapes(cfg).items():
        if name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=gen) * EMBED_STD
        elif name == "model.norm.weight":
            t = torch.full(shape, LOGIT_STD * cfg["logits_scaling"] / (EMBED_STD * math.sqrt(h)))
        elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("A_log"):
            t = torch.log(torch.arange(1, shape[0] + 1, dtype=torch.float32))
        elif name.endswith(".D"):
            t = torch.ones(shape)
        elif name.endswith("dt_bias"):
            dt = torch.exp(torch.rand(shape, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            t = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
        elif name.endswith("conv1d.bias"):
            t = 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("conv1d.weight"):
            t = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
        else:  # Linear (out, in)
            gain = OUT_GAIN if name.endswith(_RESIDUAL_WRITERS) else 1.0
            t = torch.randn(shape, generator=gen) * (gain / math.sqrt(shape[1]))
        out[name] = t.contiguous()
    return out


def build_checkpoint(out_dir, *, preset: str = "demo", seed: int = 0, **overrides) -> Path:
    """Writes a complete checkpoint into out_dir (created if needed) and returns it as a Path.

    Files: config.json, model.safetensors (fp32), tokenizer.json, tokenizer_config.json (with the chat
    template), special_tokens_map.json, generation_config.json.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = make_config(preset, **overrides)
    n_tok = write_tokenizer(out, PRESETS[preset]["vocab_size"], cfg["max_position_embeddings"], seed=0)
    if cfg["vocab_size"] < n_tok:
        raise ValueError(f"vocab_size {cfg['vocab_size']} < tokenizer size {n_tok}")
    ids = {content: i for i, (content, _) in enumerate(ADDED_TOKENS)}  # trainer puts them first, in order
    cfg.update(bos_token_id=ids[EOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD])
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen_cfg = {"bos_token_id": ids[EOS], "eos_token_id": ids[EOS], "pad_token_id": ids[PAD]}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    save_file(_init_weights(cfg, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)  # safetensors writes 0600: a non-root server could not read it
    return out


def demo_dir(cache_dir, preset: str = "demo", seed: int = 0) -> Path:
    """cache_dir/<preset>-v<VERSION>, built once. Concurrent callers are safe: each builds into its own
    temporary directory and renames it into place; the loser of the race discards its copy."""
    cache = Path(cache_dir)
    target = cache / f"{preset}-v{VERSION}" if seed == 0 else cache / f"{preset}-v{VERSION}-s{seed}"
    if (target / "model.safetensors").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache))
    try:
        build_checkpoint(tmp, preset=preset, seed=seed)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the cache may be shared with a non-root server
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
