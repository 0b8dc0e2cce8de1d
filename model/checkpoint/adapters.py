"""PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors, as peft's save_pretrained writes them):
read, checked against the base network, and turned into per-projection (A, B * scale) pairs.

Everything an adapter asks for is applied exactly, or the adapter is refused with an AdapterError naming what
(never applied in part): a LORA peft_type; targets among the projections this network has a per-row term on
(attention q/k/v/o_proj, the MLP's shared_mlp.input_linear / output_linear, the Mamba in_proj / out_proj);
`r`, `lora_alpha`, `use_rslora` (alpha / sqrt(r)) and `rank_pattern` / `alpha_pattern` (peft's rule: the first
pattern key whose regex matches the end of the module's name). Refused: DoRA, modules_to_save, embedding or
other module targets (conv1d, lm_head, embed_tokens), bias != none, trainable tokens, layer replication, any
tensor whose shape does not fit the base projection, rank > MAX_LORA_RANK, a missing or corrupt file, and pickle
weights. Under MODEL_SIGNATURE=require the adapter folder must carry a valid model-signing bundle (the base's
verification, model/checkpoint/signing.py), checked before any tensor is read.

The scale (alpha / r) is folded into B in float32, then both are cast to the serving dtype.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from model.checkpoint.signing import SignatureError, SignaturePolicy, verify_checkpoint
from model.network.arch import GraniteArch
from model.types import ADAPTER_NAME_RE

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 1 << 20
SUPPORTED = ("q_proj", "k_proj", "v_proj", "o_proj", "input_linear", "output_linear", "in_proj", "out_proj")
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# config fields that change what the adapter computes; any of them set (other than as shown) is refused
_MUST_BE = {"use_dora": False, "modules_to_save": None, "bias": "none", "lora_bias": False, "fan_in_fan_out": False,
            "layer_replication": None, "trainable_token_indices": None, "target_parameters": None,
            "alora_invocation_tokens": None, "use_qalora": False, "use_bdlora": None, "arrow_config": None}


class AdapterError(ValueError):
    """An adapter that cannot be applied exactly (the server answers 400 with this message)."""


@dataclass(frozen=True)
class LoraAdapter:
    name: str
    path: Path
    rank: int  # the largest rank of its modules
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A (r, in), B * scale (out, r))
    targets: tuple[str, ...]  # the config's target_modules, as written

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def check_name(name: str) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME_RE.match(name):
        raise AdapterError(f"adapter name {str(name)[:80]!r} is not valid: 1-64 characters of letters, digits, "
                           "'.', '_' or '-', starting with a letter or digit")
    return name


def target_shapes(a: GraniteArch) -> dict[str, tuple[int, int]]:
    """Every projection an adapter may target: module name (as in the HF checkpoint) -> (in, out)."""
    out: dict[str, tuple[int, int]] = {}
    for i, kind in enumerate(a.kinds):
        p = f"model.layers.{i}."
        if kind == "mamba":
            out[p + "mamba.in_proj"] = (a.hidden, a.m_inner + a.conv_dim + a.m_heads)
            out[p + "mamba.out_proj"] = (a.m_inner, a.hidden)
        else:
            q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
            out[p + "self_attn.q_proj"] = (a.hidden, q)
            out[p + "self_attn.k_proj"] = (a.hidden, kv)
            out[p + "self_attn.v_proj"] = (a.hidden, kv)
            out[p + "self_attn.o_proj"] = (q, a.hidden)
        out[p + "shared_mlp.input_linear"] = (a.hidden, 2 * a.mlp_inner)
        out[p + "shared_mlp.output_linear"] = (a.mlp_inner, a.hidden)
    return out


def _pattern(patterns: dict, module: str, default):
    """peft's get_pattern_key: the first key whose regex matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_config(path: Path) -> dict:
    f = path / CONFIG
    if not f.is_file():
        raise AdapterError(f"{CONFIG} not found in {path.name}")
    if f.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError(f"{CONFIG} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        cfg = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{CONFIG} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{CONFIG} must hold a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for key, ok in _MUST_BE.items():
        v = cfg.get(key, ok)
        if v != ok and not (ok is None and v in ({}, [], "")) and not (ok is False and v is None):
            what = "DoRA (use_dora)" if key == "use_dora" else key
            raise AdapterError(f"{what}={v!r} is not supported: this server applies plain LoRA deltas only")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), int | float) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise AdapterError(f"{CONFIG}: {key} must be a positive number, got {cfg.get(key)!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise AdapterError(f"{CONFIG}: {key} must be an object")
    return cfg


def _check_targets(cfg: dict) -> tuple[str, ...]:
    """A list of module names must name supported projections; a regex (a string) is checked tensor by tensor."""
    t = cfg.get("target_modules")
    if isinstance(t, str):
        return (t,)
    names = list(t or [])
    bad = [n for n in names if not isinstance(n, str) or n.rsplit(".", 1)[-1] not in SUPPORTED]
    if bad:
        raise AdapterError(f"target_modules {bad} are not supported: LoRA applies to {', '.join(SUPPORTED)} only "
                           "(embeddings, conv1d, lm_head and norms are refused)")
    return tuple(names)


def load_adapter(name: str, path: Path, arch: GraniteArch, dtype: torch.dtype, max_rank: int,
                 signature: SignaturePolicy | None = None) -> LoraAdapter:
    """Read and check the adapter at `path` (a folder) against the base architecture -> a LoraAdapter with its
    weights on the host in `dtype`. Raises AdapterError (the reason) or SignatureError."""
    check_name(name)
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter {name!r}: {path} is not a folder")
    if signature is not None and signature.mode != "off":
        pol = replace(signature, file=Path(signature.file).name)  # the adapter's own bundle, in its folder
        try:
            verify_checkpoint(path, pol)
        except SignatureError as e:
            raise AdapterError(f"adapter {name!r}: {e}") from None
    cfg = read_config(path)
    targets = _check_targets(cfg)
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise AdapterError(f"adapter {name!r}: pickle weights (*.bin, *.pt) are refused; save with safetensors")
    weights_file = path / WEIGHTS
    if not weights_file.is_file():
        raise AdapterError(f"adapter {name!r}: {WEIGHTS} not found")
    tensors = _read(weights_file, name)
    shapes = target_shapes(arch)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            what = "DoRA magnitudes" if "lora_magnitude_vector" in key else (
                "embedding LoRA" if "lora_embedding" in key else "a tensor that is not a LoRA A/B weight")
            raise AdapterError(f"adapter {name!r}: {key} is {what}; not supported")
        module = m["module"].removeprefix(PREFIX)
        if module not in shapes:
            raise AdapterError(f"adapter {name!r}: {key} targets {module!r}, which is not a projection this server "
                               f"applies LoRA to ({', '.join(SUPPORTED)}) in this base model")
        pairs.setdefault(module, {})[m["ab"]] = t
    if not pairs:
        raise AdapterError(f"adapter {name!r}: {WEIGHTS} holds no LoRA weights")
    r0, alpha0 = cfg["r"], cfg["lora_alpha"]
    out, top = {}, 0
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: {module} has lora_{'A' if 'A' not in ab else 'B'} missing")
        A, B = ab["A"], ab["B"]
        n_in, n_out = shapes[module]
        r = A.shape[0] if A.dim() == 2 else -1
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != n_in or B.shape != (n_out, r):
            raise AdapterError(f"adapter {name!r}: {module} lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not "
                               f"fit the base projection ({n_in} in, {n_out} out): a different base model?")
        want_r = _pattern(cfg.get("rank_pattern") or {}, module, r0)
        if r != want_r:
            raise AdapterError(f"adapter {name!r}: {module} has rank {r} but the config says {want_r}")
        if r > max_rank:
            raise AdapterError(f"adapter {name!r}: rank {r} ({module}) exceeds MAX_LORA_RANK={max_rank}")
        alpha = _pattern(cfg.get("alpha_pattern") or {}, module, alpha0)
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AdapterError(f"adapter {name!r}: {module} has non-finite weights")
        out[module] = (A.float().to(dtype).contiguous(), (B.float() * scale).to(dtype).contiguous())
        top = max(top, r)
    return LoraAdapter(name, path, top, out, targets)


def _read(f: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            return {k: st.get_tensor(k) for k in st.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise AdapterError(f"adapter {name!r}: {WEIGHTS} is corrupt or unreadable: {e}") from None
