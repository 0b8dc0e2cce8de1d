import json
import shutil

import pytest

from model.checkpoint.demo import build_checkpoint, demo_dir
from model.checkpoint.loader import (
    ALLOW_PATTERNS,
    ModelLoadError,
    ResolvedModel,
    resolve_model,
    validate_checkpoint,
)


@pytest.fixture
def ckpt(tmp_path, tiny_ckpt):
    """A private, editable copy of the tiny checkpoint."""
    return shutil.copytree(tiny_ckpt, tmp_path / "ckpt")


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_valid_checkpoint_returns_its_config(tiny_ckpt):
    cfg = validate_checkpoint(tiny_ckpt)
    assert cfg["model_type"] == "granitemoehybrid" and cfg["num_local_experts"] == 0


def test_wrong_model_type_names_what_was_found(ckpt):
    _edit_config(ckpt, model_type="llama")
    with pytest.raises(ModelLoadError, match="'llama'.*granitemoehybrid"):
        validate_checkpoint(ckpt)


def test_moe_variant_is_refused(ckpt):
    _edit_config(ckpt, num_local_experts=64)
    with pytest.raises(ModelLoadError, match="MoE variants .* not supported"):
        validate_checkpoint(ckpt)


@pytest.mark.parametrize("change, message", [
    ({"layer_types": ["mamba", "moe"]}, "layer_types"),
    ({"position_embedding_type": "rope"}, "position_embedding_type"),
])
def test_unsupported_architecture_details(ckpt, change, message):
    _edit_config(ckpt, **change)
    with pytest.raises(ModelLoadError, match=message):
        validate_checkpoint(ckpt)


def test_both_layer_type_spellings_are_accepted(ckpt):
    _edit_config(ckpt, layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"])
    validate_checkpoint(ckpt)


def test_pickle_only_weights_are_refused(ckpt):
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle.*pytorch_model.bin.*safetensors only"):
        validate_checkpoint(ckpt)
    (ckpt / "pytorch_model.bin").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        validate_checkpoint(ckpt)


def test_sharded_index_must_point_at_existing_shards(ckpt):
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors",
                                            "model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="missing.*00002"):
        validate_checkpoint(ckpt)


def test_missing_config_and_tokenizer(ckpt, tmp_path):
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer"):
        validate_checkpoint(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        validate_checkpoint(ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="unreadable"):
        validate_checkpoint(ckpt)


def _resolve(model_dir=None, hf=None, rev=None, token=None, model_id=None, cache="/nonexistent-cache"):
    return resolve_model(None if model_dir is None else str(model_dir), hf, rev, token, model_id, str(cache))


def test_model_dir_wins_and_nested_dir_is_found(ckpt, tmp_path):
    assert _resolve(ckpt, hf="ibm-granite/granite-4.0-h-micro") == ResolvedModel(ckpt, ckpt.name, False)
    outer = tmp_path / "opt-ml-model"
    (outer / "code").mkdir(parents=True)  # SageMaker's code/ folder sits next to the nested checkpoint
    (outer / "code" / "config.json").write_text("{}")
    shutil.move(str(ckpt), outer / "granite")
    assert _resolve(outer).path == outer / "granite"
    shutil.copytree(outer / "granite", outer / "other")
    with pytest.raises(ModelLoadError, match="several checkpoints"):
        _resolve(outer)


def test_demo_model_id(tmp_path, monkeypatch, tiny_ckpt):
    import model.checkpoint.demo as demo

    seen = []
    monkeypatch.setattr(demo, "demo_dir", lambda cache: seen.append(cache) or tiny_ckpt)
    resolved = _resolve("/opt/ml/model-absent", model_id="demo", cache=tmp_path)
    assert resolved.is_demo and resolved.path == tiny_ckpt and "demo" in resolved.name
    assert seen == [tmp_path]


def test_nothing_configured_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no model: mount a checkpoint .*HF_MODEL_ID.*MODEL_ID=demo"):
        _resolve(tmp_path / "absent")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="no config.json.*weights.bin"):
        _resolve(tmp_path)


def test_hf_download_arguments(monkeypatch, tmp_path, tiny_ckpt):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(tiny_ckpt)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    resolved = _resolve(tmp_path / "empty", hf="org/granite", rev="abc123", token="hf_secret", cache=tmp_path)
    assert resolved == ResolvedModel(tiny_ckpt, "org/granite", False)
    (kw,) = calls
    assert (kw["repo_id"], kw["revision"], kw["token"], kw["cache_dir"]) == ("org/granite", "abc123", "hf_secret",
                                                                             str(tmp_path))
    patterns = kw["allow_patterns"]
    assert patterns == ALLOW_PATTERNS and "*.safetensors" in patterns
    import fnmatch
    for pickle in ("pytorch_model.bin", "model.pt", "weights.pth", "x.pkl"):
        assert not any(fnmatch.fnmatch(pickle, p) for p in patterns)


def test_hf_download_failure_hides_the_token(monkeypatch, tmp_path):
    import huggingface_hub

    def failing(**kwargs):
        raise OSError(f"401 for token {kwargs['token']}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(ModelLoadError, match="could not download HF_MODEL_ID=org/x@main") as err:
        _resolve(None, hf="org/x", rev="main", token="hf_secret", cache=tmp_path)
    assert "hf_secret" not in str(err.value)


def test_downloaded_pickle_only_repo_is_refused(monkeypatch, tmp_path, tiny_ckpt):
    import huggingface_hub

    repo = shutil.copytree(tiny_ckpt, tmp_path / "snap")
    (repo / "model.safetensors").unlink()  # allow_patterns skipped the pickles: nothing to load
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: str(repo))
    with pytest.raises(ModelLoadError, match="safetensors"):
        _resolve(None, hf="org/pickles", cache=tmp_path)


def test_unreadable_weights_are_named(tmp_path, monkeypatch):
    import os

    ckpt = build_checkpoint(tmp_path / "c", preset="tiny")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith(".safetensors") else real_access(p, mode))
    with pytest.raises(ModelLoadError, match="not readable"):
        validate_checkpoint(ckpt)


def test_built_checkpoints_are_world_readable(tmp_path):
    import stat

    ckpt = demo_dir(tmp_path / "cache", preset="tiny")
    assert ckpt.stat().st_mode & stat.S_IROTH and ckpt.stat().st_mode & stat.S_IXOTH
    for f in ckpt.iterdir():
        assert f.stat().st_mode & stat.S_IROTH, f.name
