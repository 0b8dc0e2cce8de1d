"""The upstream fused kernels this machine can import: mamba-ssm's Triton ops (importable without a GPU; they run
on CPU tensors under TRITON_INTERPRET=1), causal-conv1d's CUDA ops, and our paged decode attention.
model/network/kernels.py chooses, per op, between these and the pure-torch reference.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class FusedOps:
    mamba_chunk_scan_combined: Callable | None = None
    selective_state_update: Callable | None = None
    causal_conv1d_fn: Callable | None = None
    causal_conv1d_update: Callable | None = None
    errors: dict[str, str] | None = None
    rms_norm_fn: Callable | None = None  # mamba_ssm.ops.triton.layer_norm (residual / prenorm / rowscale)
    rmsnorm_gated: Callable | None = None  # mamba_ssm.ops.triton.layernorm_gated.rmsnorm_fn
    swiglu: Callable | None = None  # mamba_ssm.ops.triton.k_activations
    paged_decode_attention: Callable | None = None  # model.paged_attention

    # the Triton ones (importable without a GPU; they run on CPU tensors under TRITON_INTERPRET=1)
    TRITON = ("mamba_chunk_scan_combined", "selective_state_update", "rms_norm_fn", "rmsnorm_gated", "swiglu",
              "paged_decode_attention")


def import_mamba_triton(name: str) -> Any:
    """Import mamba_ssm.ops.triton.<name> without running mamba_ssm/__init__.py when that fails.

    mamba_ssm/__init__ imports the compiled selective_scan_cuda; the Triton kernels don't need it.
    If the normal import fails we register a bare package module whose __path__ points at the
    installed package directory, so only the submodules themselves execute.
    """
    full = f"mamba_ssm.ops.triton.{name}"
    try:
        return importlib.import_module(full)
    except Exception:  # noqa: BLE001 - ImportError / OSError from the compiled extension
        spec = importlib.util.find_spec("mamba_ssm") if "mamba_ssm" not in sys.modules else None
        if spec is None or not spec.submodule_search_locations:
            raise
        for key in [k for k in sys.modules if k == "mamba_ssm" or k.startswith("mamba_ssm.")]:
            del sys.modules[key]  # drop the half-imported package
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec
        sys.modules["mamba_ssm"] = pkg
        return importlib.import_module(full)


_TRITON_SOURCES = {  # FusedOps field -> (module, attribute)
    "mamba_chunk_scan_combined": ("ssd_combined", "mamba_chunk_scan_combined"),
    "selective_state_update": ("selective_state_update", "selective_state_update"),
    "rms_norm_fn": ("layer_norm", "rms_norm_fn"),
    "rmsnorm_gated": ("layernorm_gated", "rmsnorm_fn"),
    "swiglu": ("k_activations", "swiglu"),
}


def load_fused(cuda: bool = True) -> FusedOps:
    """The fused kernels that import here; cuda=False: the Triton ones only (no causal-conv1d)."""
    ops, errors = FusedOps(), {}
    for field, (module, attr) in _TRITON_SOURCES.items():
        try:
            setattr(ops, field, getattr(import_mamba_triton(module), attr))
        except Exception as e:  # noqa: BLE001 - any import failure means "not available"
            errors[field] = repr(e)
    try:
        ops.paged_decode_attention = importlib.import_module("model.network.paged_attention").paged_decode_attention
    except Exception as e:  # noqa: BLE001
        errors["paged_decode_attention"] = repr(e)
    if cuda:
        try:
            cc = importlib.import_module("causal_conv1d")
            ops.causal_conv1d_fn, ops.causal_conv1d_update = cc.causal_conv1d_fn, cc.causal_conv1d_update
        except Exception as e:  # noqa: BLE001
            errors["causal_conv1d"] = repr(e)
    ops.errors = errors
    return ops


def accepts(fn: Callable, arg: str) -> bool:
    try:
        return arg in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
