"""The real upstream Triton kernels (mamba-ssm's SSD scan, selective_state_update, norms) on CPU tensors,
run by Triton's interpreter. This folder runs in its own pytest process (`make test` does it):

- TRITON_INTERPRET=1 must be in the environment before anything imports triton (transformers' model
  imports do), so it cannot be switched on from inside a process that already collected other tests;
- MAMBA_DETERMINISTIC=1 keeps one autotune config per kernel (the interpreter cannot benchmark);
- mamba_ssm/__init__.py imports the compiled selective_scan_cuda, absent from the Triton-only build:
  model.kernels imports the Triton submodules without executing it (the same code production runs);
- every wrapper enters `torch.cuda.device(x.device.index)`, which raises for CPU tensors (index None):
  a null context stands in for index None, for this process only;
- transformers binds its Mamba-2 functions to mamba_ssm's at import time whenever `import mamba_ssm`
  works, which it does once model.kernels has registered the bare package: Hugging Face's model, the
  oracle, would then run the very kernels under test. Its modeling module is imported here first, while
  `import mamba_ssm` still fails, so it keeps its torch path (`hf_torch_path` checks that).

A missing mamba-ssm or triton is a failure here, never a skip: `make install` installs both.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    raise pytest.UsageError("tests/triton needs TRITON_INTERPRET=1 set before the process starts: "
                            "run `make test`, or `TRITON_INTERPRET=1 python -m pytest tests/triton`")
os.environ.setdefault("MAMBA_DETERMINISTIC", "1")
# (its advice, cached autotuning, is moot with one config per kernel)
warnings.filterwarnings("ignore", message="Deterministic mode: set TRITON_CACHE_AUTOTUNING")

import torch  # noqa: E402

_cuda_device = torch.cuda.device


def _device_or_null(index):
    return contextlib.nullcontext() if index is None else _cuda_device(index)


torch.cuda.device = _device_or_null

import transformers.models.granitemoehybrid.modeling_granitemoehybrid as hf_granite  # noqa: E402


@pytest.fixture(scope="session")
def hf_torch_path():
    """Asserts Hugging Face's Mamba-2 mixer runs its own torch code, not mamba_ssm's kernels."""
    import inspect

    for fn in (hf_granite.mamba2_chunk_scan, hf_granite.mamba2_selective_state_update):
        assert inspect.getclosurevars(fn).nonlocals["is_new_implementation"] is False, fn.__name__


@pytest.fixture(scope="session")
def mamba_ops():
    """model.fused_ops.FusedOps with the real mamba-ssm Triton kernels (causal-conv1d is CUDA C++: absent)."""
    from model.fused_ops import load_fused

    ops = load_fused()
    missing = [n for n in ("mamba_chunk_scan_combined", "selective_state_update") if getattr(ops, n) is None]
    assert not missing, f"mamba-ssm Triton kernels not importable ({missing}): {ops.errors}; run make install"
    return ops


@pytest.fixture(scope="session")
def interp_ops(mamba_ops):
    """What the engine's fused path runs: the real mamba-ssm kernels, and causal-conv1d's fakes (CUDA C++ only,
    tests/fake_kernels.py)."""
    from model.fused_ops import FusedOps
    from tests import fake_kernels

    return FusedOps(mamba_ops.mamba_chunk_scan_combined, mamba_ops.selective_state_update,
                    fake_kernels.causal_conv1d_fn, fake_kernels.causal_conv1d_update, {})
