import hashlib
import json
import threading

import pytest
import torch
from safetensors import safe_open

from model.checkpoint.demo import PRESETS, build_checkpoint, demo_dir, make_config, weight_shapes


def _digests(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_same_seed_gives_byte_identical_checkpoint(tmp_path, tiny_ckpt):
    again = build_checkpoint(tmp_path / "again", preset="tiny", seed=0)
    assert _digests(again) == _digests(tiny_ckpt)
    other = build_checkpoint(tmp_path / "other", preset="tiny", seed=1)
    assert _digests(other)["model.safetensors"] != _digests(tiny_ckpt)["model.safetensors"]
    assert _digests(other)["tokenizer.json"] == _digests(tiny_ckpt)["tokenizer.json"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_config_is_granite_4_h_shaped(preset):
    cfg = make_config(preset)
    h = cfg["hidden_size"]
    head_dim = h // cfg["num_attention_heads"]
    assert cfg["model_type"] == "granitemoehybrid"
    assert cfg["num_local_experts"] == 0 and cfg["shared_intermediate_size"] == 4 * h
    assert {"mamba", "attention"} == set(cfg["layer_types"])
    assert cfg["layer_types"][0] == "mamba"  # Granite's first attention layer comes after Mamba layers
    assert cfg["position_embedding_type"] == "nope" and cfg["tie_word_embeddings"] is True
    assert (cfg["embedding_multiplier"], cfg["residual_multiplier"], cfg["logits_scaling"]) == (12.0, 0.22, 8.0)
    assert cfg["attention_multiplier"] == pytest.approx(1.0 / head_dim)
    assert cfg["num_attention_heads"] == 4 * cfg["num_key_value_heads"] or preset == "tiny"
    assert cfg["mamba_n_heads"] * cfg["mamba_d_head"] == cfg["mamba_expand"] * h


def test_hf_config_loads_and_remaps_layer_names(tiny_ckpt):
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(tiny_ckpt, local_files_only=True)
    raw = json.loads((tiny_ckpt / "config.json").read_text())
    assert type(cfg).__name__ == "GraniteMoeHybridConfig"
    expect = [{"mamba": "linear_attention", "attention": "full_attention"}[t] for t in raw["layer_types"]]
    assert cfg.layer_types == expect
    tok = AutoTokenizer.from_pretrained(tiny_ckpt, local_files_only=True)
    assert cfg.vocab_size >= len(tok)
    assert cfg.eos_token_id == cfg.bos_token_id == tok.convert_tokens_to_ids("<|end_of_text|>")
    assert cfg.pad_token_id == tok.convert_tokens_to_ids("<|pad|>")
    assert tok.padding_side == "left"


def test_saved_weights_match_hf_parameter_names(tiny_ckpt):
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    with safe_open(str(tiny_ckpt / "model.safetensors"), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())
    assert saved == weight_shapes(cfg)


@pytest.fixture(scope="module")
def hf_tiny(tiny_ckpt):
    from transformers import GraniteMoeHybridForCausalLM

    torch.manual_seed(0)
    model, info = GraniteMoeHybridForCausalLM.from_pretrained(
        tiny_ckpt, local_files_only=True, output_loading_info=True
    )
    return model.eval(), info


def test_hf_loads_every_weight(hf_tiny):
    _, info = hf_tiny
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_hf_forward_and_generate_are_finite_and_context_dependent(hf_tiny, tiny_ckpt):
    from model.text.tokenizer import Tokenizer

    model, _ = hf_tiny
    tok = Tokenizer.from_dir(tiny_ckpt)
    a = torch.tensor([tok.encode("The cat is here. The cat is here. Yes it is")])
    b = torch.tensor([tok.encode("Tokyo data slowly, a result again. Yes it is")])
    with torch.no_grad():
        la, lb = model(a).logits[0, -1], model(b).logits[0, -1]
        assert torch.isfinite(la).all() and torch.isfinite(lb).all()
        # Same last tokens, different history: the mixers must matter (else state bugs go unnoticed).
        assert (la - lb).abs().max() > 0.1
        out = model.generate(a, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, a.shape[1]:].tolist()
    assert len(new) > 0 and len(set(new)) > 3  # not one token repeated


def test_layer_type_spelling_of_transformers_5_also_loads(tmp_path):
    from transformers import AutoConfig

    types = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
    path = build_checkpoint(tmp_path, preset="tiny", layer_types=types)
    assert AutoConfig.from_pretrained(path, local_files_only=True).layer_types == types


def test_overrides_reshape_the_model():
    cfg = make_config("tiny", num_hidden_layers=6, attention_layers=(2, 5), mamba_chunk_size=8)
    assert cfg["layer_types"] == ["mamba", "mamba", "attention", "mamba", "mamba", "attention"]
    assert cfg["mamba_chunk_size"] == 8
    with pytest.raises(ValueError, match="preset"):
        make_config("huge")
    with pytest.raises(ValueError, match="mamba_n_heads"):
        make_config("tiny", mamba_n_heads=3)


def test_vocab_size_must_cover_the_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        build_checkpoint(tmp_path, preset="tiny", vocab_size=100)
    padded = build_checkpoint(tmp_path / "padded", preset="tiny", vocab_size=576)  # like Granite's 100352
    assert json.loads((padded / "config.json").read_text())["vocab_size"] == 576


def test_demo_dir_builds_once_and_concurrently(tmp_path, monkeypatch):
    import model.checkpoint.demo as demo

    calls = []
    real = demo.build_checkpoint
    monkeypatch.setattr(demo, "build_checkpoint", lambda out, **kw: calls.append(out) or real(out, **kw))
    results = []
    threads = [threading.Thread(target=lambda: results.append(demo_dir(tmp_path, preset="tiny"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    path = results[0]
    assert path.parent == tmp_path and (path / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp dirs left behind
    n = len(calls)
    assert demo_dir(tmp_path, preset="tiny") == path and len(calls) == n  # cached: no rebuild


def test_demo_preset_size(demo_ckpt):
    with safe_open(str(demo_ckpt / "model.safetensors"), "pt") as f:
        n = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
    assert 5e6 < n < 30e6  # small enough for a 2-core CPU, big enough to be a real workload
