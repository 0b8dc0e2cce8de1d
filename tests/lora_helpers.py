"""PEFT LoRA adapters for the tests: made with peft on Hugging Face's GraniteMoeHybridForCausalLM (random, non-zero
A and B on every target), saved with save_pretrained; and the peft-applied HF model as the oracle."""

from __future__ import annotations

from pathlib import Path

import torch

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "input_linear", "output_linear", "in_proj", "out_proj"]

# name -> LoraConfig keywords: every target; rsLoRA with rank and alpha patterns; attention + Mamba only
ADAPTERS = {
    "fr": dict(r=4, lora_alpha=8, target_modules=ALL_TARGETS),
    "de": dict(r=2, lora_alpha=4, use_rslora=True, target_modules=ALL_TARGETS, rank_pattern={"in_proj": 6},
               alpha_pattern={"o_proj": 3.0, "output_linear": 1.0}),
    "ja": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "in_proj", "out_proj"]),
}


def make_adapter(base_dir: Path, out_dir: Path, seed: int, **lora_kw) -> Path:
    """A peft adapter for the checkpoint at base_dir, A and B random (B would be zeros after a real init)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GraniteMoeHybridForCausalLM

    base = GraniteMoeHybridForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora_kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)
    model.save_pretrained(out_dir)
    return Path(out_dir)


def peft_model(base_dir: Path, adapter_dir: Path | None):
    """The oracle: HF's model (fp32) with the adapter applied by peft (None: the base alone)."""
    from peft import PeftModel
    from transformers import GraniteMoeHybridForCausalLM

    base = GraniteMoeHybridForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    return base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir).eval()


def greedy(model, prompt: list[int], max_new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new)
    return out[0, len(prompt):].tolist()
