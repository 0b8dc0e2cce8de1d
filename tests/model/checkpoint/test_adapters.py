"""model/checkpoint/adapters.py: a PEFT adapter is read exactly (targets, ranks, alphas, rsLoRA, patterns) or refused
at registration with the reason, never applied in part."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint.adapters import AdapterError, check_name, load_adapter, target_shapes
from model.network.arch import GraniteArch
from tests.lora_helpers import ALL_TARGETS, make_adapter


@pytest.fixture(scope="module")
def arch(tiny_ckpt):
    return GraniteArch.from_dir(tiny_ckpt)


@pytest.fixture(scope="module")
def good(tiny_ckpt, tmp_path_factory):
    return make_adapter(tiny_ckpt, tmp_path_factory.mktemp("ad") / "good", seed=1, r=2, lora_alpha=4, use_rslora=True,
                        target_modules=ALL_TARGETS, rank_pattern={"in_proj": 6}, alpha_pattern={"o_proj": 3.0})


def _copy(good, tmp_path, config=None, tensors=None):
    d = tmp_path / "bad"
    shutil.copytree(good, d)
    if config is not None:
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(config)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        sd = load_file(d / "adapter_model.safetensors")
        save_file(tensors(sd), d / "adapter_model.safetensors")
    return d


def test_reads_ranks_alphas_and_scales_like_peft(good, arch):
    ad = load_adapter("good", good, arch, torch.float32, max_rank=8)
    raw = load_file(good / "adapter_model.safetensors")
    shapes = target_shapes(arch)
    assert set(ad.weights) == set(shapes)  # every projection of every layer
    assert ad.rank == 6
    for module, (A, B) in ad.weights.items():
        key = f"base_model.model.{module}"
        r = 6 if module.endswith("in_proj") else 2
        alpha = 3.0 if module.endswith("o_proj") else 4
        assert A.shape == (r, shapes[module][0]) and B.shape == (shapes[module][1], r)
        assert torch.equal(A, raw[key + ".lora_A.weight"])
        torch.testing.assert_close(B, raw[key + ".lora_B.weight"] * (alpha / math.sqrt(r)))
    assert ad.nbytes == sum(t.numel() * 4 for t in raw.values())


@pytest.mark.parametrize("config, reason", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens"),
    ({"target_modules": ["conv1d"]}, "conv1d"),
    ({"r": 0}, "r must be"),
    ({"rank_pattern": {"in_proj": 5}}, "rank 6 but the config says 5"),
])
def test_refuses_what_it_cannot_apply_naming_it(good, arch, tmp_path, config, reason):
    with pytest.raises(AdapterError, match=reason):
        load_adapter("bad", _copy(good, tmp_path, config=config), arch, torch.float32, max_rank=8)


def test_refuses_rank_over_the_limit(good, arch):
    with pytest.raises(AdapterError, match="rank 6 .* exceeds MAX_LORA_RANK=4"):
        load_adapter("good", good, arch, torch.float32, max_rank=4)


def test_refuses_a_base_that_does_not_match(tiny_ckpt, arch, tmp_path, ckpt_factory):
    other = ckpt_factory("tiny", seed=3, hidden_size=32, mamba_n_heads=4)
    d = make_adapter(other, tmp_path / "other", seed=2, r=2, lora_alpha=2, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match="do not fit the base projection"):
        load_adapter("other", d, arch, torch.float32, max_rank=8)


@pytest.mark.parametrize("edit, reason", [
    (lambda sd: {**sd, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(2, 3)}, "embedding LoRA"),
    (lambda sd: {**sd, "base_model.model.model.layers.0.mamba.in_proj.lora_magnitude_vector": torch.zeros(3)}, "DoRA"),
    (lambda sd: {**sd, "base_model.model.lm_head.lora_A.weight": torch.zeros(2, 3)}, "lm_head"),
    (lambda sd: {k: v for k, v in sd.items() if "layers.1.self_attn.q_proj.lora_B" not in k}, "lora_B missing"),
    (lambda sd: {k: v * float("nan") if "layers.0.mamba.out_proj.lora_A" in k else v for k, v in sd.items()},
     "non-finite"),
])
def test_refuses_bad_tensors(good, arch, tmp_path, edit, reason):
    with pytest.raises(AdapterError, match=reason):
        load_adapter("bad", _copy(good, tmp_path, tensors=edit), arch, torch.float32, max_rank=8)


def test_refuses_missing_and_corrupt_files(good, arch, tmp_path):
    d = _copy(good, tmp_path)
    (d / "adapter_model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(AdapterError, match="corrupt"):
        load_adapter("bad", d, arch, torch.float32, max_rank=8)
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors not found"):
        load_adapter("bad", d, arch, torch.float32, max_rank=8)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter("bad", d, arch, torch.float32, max_rank=8)
    (d / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json not found"):
        load_adapter("bad", d, arch, torch.float32, max_rank=8)
    d2 = _copy(good, tmp_path / "p")
    (d2 / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match="pickle"):
        load_adapter("bad", d2, arch, torch.float32, max_rank=8)


@pytest.mark.parametrize("name", ["", "../x", "a/b", "x" * 65, ".hidden", "a b"])
def test_names_are_checked(name):
    with pytest.raises(AdapterError, match="not valid"):
        check_name(name)
