"""CUDA image check: the fused-kernel packages load against the installed torch.

Runs at image build time (no GPU there: it proves the wheels match torch's ABI and the Triton
kernels import) and can be rerun on a GPU host: `docker run --gpus all IMAGE python
/opt/program/serve/container/check_kernels.py`.
"""

import importlib
import importlib.metadata
import json

import torch

assert torch.version.cuda and torch.version.cuda.startswith("12."), f"torch is not a CUDA 12 build: {torch.version.cuda}"
# The prebuilt kernel wheels are the cxx11abiTRUE builds; a mismatch shows up as undefined symbols.
assert torch.compiled_with_cxx11_abi(), "torch is not built with the C++11 ABI"

MODULES = [
    "causal_conv1d_cuda",  # compiled extension of causal-conv1d
    "causal_conv1d",
    "selective_scan_cuda",  # compiled extension of mamba-ssm (imported by mamba_ssm/__init__)
    "mamba_ssm",
    "mamba_ssm.ops.triton.ssd_combined",  # chunked SSD scan (prefill)
    "mamba_ssm.ops.triton.selective_state_update",  # one-token state update (decode)
    "triton",
]
for name in MODULES:
    importlib.import_module(name)

from causal_conv1d import causal_conv1d_fn, causal_conv1d_update  # noqa: E402,F401
from mamba_ssm.ops.triton.selective_state_update import selective_state_update  # noqa: E402,F401
from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # noqa: E402,F401

report = {
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "cuda_available": torch.cuda.is_available(),
    "mamba_ssm": importlib.metadata.version("mamba-ssm"),
    "causal_conv1d": importlib.metadata.version("causal-conv1d"),
    "triton": importlib.metadata.version("triton"),
}
if torch.cuda.is_available():
    report["device"] = torch.cuda.get_device_name(0)
print(json.dumps(report))
