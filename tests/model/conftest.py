"""Fixtures of the model tests: the Hugging Face reference model on the tiny checkpoint (fp32), the oracle the
engine's greedy tokens are held to."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def hf_model(tiny_ckpt):
    from transformers import GraniteMoeHybridForCausalLM

    return GraniteMoeHybridForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
