"""Find the checkpoint to serve and check that this container can serve it.

Order: MODEL_ID=demo -> the built-in demo model; else a Hugging Face checkpoint in
model_dir (/opt/ml/model), also one level down when a model.tar.gz extracted into a single folder; else
hf_model_id downloaded (safetensors, configs and tokenizer files only); else a clear error. Never a
silent fallback to a random model. No environment variables are read here (serve/config.py does that).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from model.checkpoint.signing import SignaturePolicy, signed_files, verify_checkpoint
from model.network.arch import ATTENTION_KINDS, MAMBA_KINDS  # the layer-type spellings, defined once

DEMO_NAME = "granite-4.0-h-demo-random-weights"
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt"]  # never pickles
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
NO_MODEL = "no model: mount a checkpoint at /opt/ml/model or set HF_MODEL_ID, or MODEL_ID=demo for the demo model"


class ModelLoadError(RuntimeError):
    pass


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    name: str
    is_demo: bool
    config: dict = field(default_factory=dict, compare=False)  # its validated config.json


def resolve_model(model_dir: str | None, hf_model_id: str | None, hf_revision: str | None, hf_token: str | None,
                  model_id: str | None, cache_dir: str, signature: SignaturePolicy | None = None) -> ResolvedModel:
    """`signature`: checked (model/checkpoint/signing.py) before any checkpoint file is read; None skips the check."""
    if model_id and model_id.strip().lower() == "demo":
        from model.checkpoint.demo import demo_dir

        path = demo_dir(Path(cache_dir))
        if signature is not None:
            verify_checkpoint(path, signature)
        return ResolvedModel(path=path, name=DEMO_NAME, is_demo=True, config=validate_checkpoint(path))
    local = find_checkpoint_dir(Path(model_dir)) if model_dir else None
    if local is not None:
        if signature is not None:
            verify_checkpoint(local, signature, mount=Path(model_dir))
        return ResolvedModel(path=local, name=_model_name(local), is_demo=False, config=validate_checkpoint(local))
    if hf_model_id:
        sig_file = signature.file if signature is not None and signature.mode != "off" else None
        path = download(hf_model_id, hf_revision, hf_token, cache_dir, sig_file)
        if signature is not None:
            verify_checkpoint(path, signature, allow_symlinks=True)  # Hub cache snapshots link into blobs/
        return ResolvedModel(path=path, name=hf_model_id, is_demo=False, config=validate_checkpoint(path))
    if model_dir and Path(model_dir).is_dir() and any(Path(model_dir).iterdir()):
        found = ", ".join(sorted(p.name for p in Path(model_dir).iterdir())[:10])
        raise ModelLoadError(f"{model_dir} holds no Hugging Face checkpoint (no config.json; found: {found}). {NO_MODEL}")
    raise ModelLoadError(NO_MODEL)


def find_checkpoint_dir(root: Path) -> Path | None:
    """root if it holds config.json, else its only sub-folder that does (tar.gz extractions often nest
    one level; SageMaker's code/ folder and hidden folders are ignored)."""
    if not root.is_dir():
        return None
    if (root / "config.json").is_file():
        return root
    subs = [p for p in root.iterdir() if p.is_dir() and p.name != "code" and not p.name.startswith(".")]
    nested = [p for p in subs if (p / "config.json").is_file()]
    if len(nested) > 1:
        names = ", ".join(sorted(p.name for p in nested))
        raise ModelLoadError(f"{root} holds several checkpoints ({names}); mount exactly one")
    return nested[0] if nested else None


def download(repo: str, revision: str | None, token: str | None, cache_dir: str,
             signature_file: str | None = None) -> Path:
    """signature_file: fetched first when the repo has it, then every file it lists (a partial download
    of a signed repo could not verify)."""
    try:
        from huggingface_hub import snapshot_download

        patterns = list(ALLOW_PATTERNS)
        if signature_file and not os.path.isabs(signature_file):
            patterns += _signed_patterns(repo, revision, token, cache_dir, signature_file)
        path = snapshot_download(repo_id=repo, revision=revision, token=token or None, cache_dir=cache_dir,
                                 allow_patterns=patterns)
    except Exception as e:  # hub errors name the repo but must not echo the token
        reason = f"{type(e).__name__}: {e}"
        if token:
            reason = reason.replace(token, "***")
        at = f"@{revision}" if revision else ""
        raise ModelLoadError(f"could not download HF_MODEL_ID={repo}{at}: {reason}") from None
    return Path(path)


def _signed_patterns(repo: str, revision: str | None, token: str | None, cache_dir: str, name: str) -> list[str]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        sig = hf_hub_download(repo_id=repo, filename=name, revision=revision, token=token or None, cache_dir=cache_dir)
    except EntryNotFoundError:
        return []  # unsigned repo: MODEL_SIGNATURE decides after the download
    return [name, *signed_files(Path(sig))]


def validate_checkpoint(path) -> dict:
    """The parsed config.json of a servable Granite 4.0 H (dense hybrid) safetensors checkpoint, or
    ModelLoadError saying what is wrong. The architecture is built in (no auto_map / remote code)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path}: no config.json (not a Hugging Face checkpoint)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{cfg_file}: unreadable ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{cfg_file}: expected a JSON object")
    kind = cfg.get("model_type")
    if kind != "granitemoehybrid":
        raise ModelLoadError(
            f"{cfg_file}: model_type is {kind!r}, but this container serves only IBM Granite 4.0 H hybrid models "
            f"(model_type 'granitemoehybrid', e.g. ibm-granite/granite-4.0-h-micro)")
    experts = cfg.get("num_local_experts") or 0
    if experts > 0:
        raise ModelLoadError(
            f"{cfg_file}: num_local_experts={experts}: MoE variants (e.g. granite-4.0-h-tiny/small) are not "
            f"supported; use a dense one such as granite-4.0-h-micro (num_local_experts 0)")
    kinds = cfg.get("layer_types") or cfg.get("layers_block_type") or []
    bad = sorted({k for k in kinds if k not in MAMBA_KINDS + ATTENTION_KINDS})
    if not kinds or bad:
        raise ModelLoadError(f"{cfg_file}: layer_types must list Mamba and attention layers (got {bad or kinds})")
    pos = cfg.get("position_embedding_type")
    if pos not in (None, "nope"):
        raise ModelLoadError(f"{cfg_file}: position_embedding_type {pos!r} is not supported (Granite 4.0 H uses none)")
    _check_weights(path)
    _check_tokenizer(path)
    return cfg


def _check_readable(files) -> None:
    # A weight file the server's user cannot read would otherwise surface as a misleading FileNotFoundError.
    unreadable = sorted(f.name for f in files if not os.access(f, os.R_OK))
    if unreadable:
        raise ModelLoadError(f"weight files not readable by this user (uid {os.getuid()}): {unreadable[:5]}; "
                             f"make them world-readable (chmod a+r) or run as their owner")


def _check_weights(path: Path) -> None:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{index}: unreadable ({e})") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ModelLoadError(f"{path}: safetensors shards listed in the index are missing: {missing[:5]}")
        _check_readable(path / s for s in shards)
        return
    weights = list(path.glob("*.safetensors"))
    if weights:
        _check_readable(weights)
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{path}: weights are only in pickle format ({', '.join(pickles[:5])}); this container loads "
            f"*.safetensors only (pickles can run code). Convert them, e.g. save_pretrained(safe_serialization=True)")
    raise ModelLoadError(f"{path}: no *.safetensors weights found")


def _check_tokenizer(path: Path) -> None:
    if (path / "tokenizer.json").is_file() or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file()):
        return
    raise ModelLoadError(f"{path}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt)")


def _model_name(path: Path) -> str:
    try:
        name = json.loads((path / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError):
        name = None
    return name if isinstance(name, str) and name and not name.startswith("/") else path.name
