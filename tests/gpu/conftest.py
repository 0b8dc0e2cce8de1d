"""tests/gpu: fp32 `tl.dot` in exact (IEEE) precision, not TF32, so an fp32 mismatch against the torch
reference is plumbing, not rounding (set before any Triton kernel compiles; CUDA machines only).
GPU_CHECK_CONV=torch (set by bench/gpu_check.py when causal-conv1d could not be built there): the conv
ops run the torch reference; the conv kernel tests skip saying so and the rest checks the Mamba kernels."""

from __future__ import annotations

import os

import torch

if torch.cuda.is_available():
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
