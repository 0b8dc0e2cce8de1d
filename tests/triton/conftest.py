"""The real upstream Triton kernels (mamba-ssm's SSD scan, selective_state_update, norms) on CPU tensors,
run by Triton's interpreter. This folder runs in its own pytest process (`make test` does it):

- TRITON_INTERPRET=1 must be in the environment before anything imports triton (transformers' model
  imports do), so it cannot be switched on from inside a process that already collected other tests;
- MAMBA_DETERMINISTIC=1 keeps one autotune config per kernel (the interpreter cannot benchmark);
- mamba_ssm/__init__.py imports the compiled selective_scan_cuda, absent from the Triton-only build:
  model.kernels imports the Triton submodules without executing it (the same code production runs);
- every wrapper enters `torch.cuda.device(x.device.index)`, which raises for CPU tensors (index None):
  a null context stands in for index None, for this process only;
- transformers may bind its Mamba-2 functions to mamba_ssm's (at import time whenever `import mamba_ssm`
  works, which it does once model.kernels has registered the bare package; 5.25 binds them through hub-kernel
  wrappers that pick by device): Hugging Face's model, the oracle, would then run the very kernels under test.
  Its modeling module is imported here first, while `import mamba_ssm` still fails, and `hf_reference` checks
  by behaviour, on whatever transformers is installed, that no Triton kernel launches while the oracle runs.

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

import transformers.models.granitemoehybrid.modeling_granitemoehybrid  # noqa: E402,F401  (first: see above)


@contextlib.contextmanager
def count_kernel_launches():
    """Counts Triton kernel launches by kernel name, however the caller reached the kernel (a reference bound at
    import time included): under the interpreter every launch, autotuned or not, ends in InterpretedFunction.run."""
    from collections import Counter

    from triton.runtime.interpreter import InterpretedFunction

    counts: Counter[str] = Counter()
    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        if not kwargs.get("warmup"):
            counts[self.__name__] += 1
        return run(self, *args, **kwargs)

    InterpretedFunction.run = counted
    try:
        yield counts
    finally:
        InterpretedFunction.run = run


@pytest.fixture(scope="session")
def hf_reference(mamba_ops):
    """A context for running Hugging Face's model as the oracle: it fails if any Triton kernel launched inside
    it, i.e. if Hugging Face ran mamba_ssm's kernels instead of its own torch code. The counter is first shown
    to see a launch of the kernel the oracle must not reach."""
    with count_kernel_launches() as seen:
        x = torch.randn(1, 2, 4)
        mamba_ops.selective_state_update(torch.zeros(1, 2, 4, 8), x, torch.rand(1, 2, 4), -torch.ones(2, 4, 8),
                                         torch.randn(1, 1, 8), torch.randn(1, 1, 8), D=torch.ones(2, 4),
                                         dt_bias=torch.zeros(2, 4))
    assert seen, "the launch counter saw no launch of selective_state_update: it cannot guard the oracle"

    @contextlib.contextmanager
    def no_kernels():
        with count_kernel_launches() as launched:
            yield
        assert not launched, f"Hugging Face's reference ran Triton kernels, not its torch code: {dict(launched)}"

    return no_kernels


@pytest.fixture(scope="session")
def mamba_ops():
    """model.network.fused_ops.FusedOps with the real mamba-ssm Triton kernels (causal-conv1d is CUDA C++: absent)."""
    from model.network.fused_ops import load_fused

    ops = load_fused()
    missing = [n for n in ("mamba_chunk_scan_combined", "selective_state_update") if getattr(ops, n) is None]
    assert not missing, f"mamba-ssm Triton kernels not importable ({missing}): {ops.errors}; run make install"
    return ops


@pytest.fixture(scope="session")
def interp_ops(mamba_ops):
    """What the engine's fused path runs: the real mamba-ssm kernels, and causal-conv1d's fakes (CUDA C++ only,
    tests/fake_kernels.py)."""
    from model.network.fused_ops import FusedOps
    from tests import fake_kernels

    return FusedOps(mamba_ops.mamba_chunk_scan_combined, mamba_ops.selective_state_update,
                    fake_kernels.causal_conv1d_fn, fake_kernels.causal_conv1d_update, {})
