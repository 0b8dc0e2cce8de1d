"""The oracle guard (conftest.hf_reference) fails when a Triton kernel launches inside it, however it was reached."""

from __future__ import annotations

import pytest
import torch


def test_guard_fails_on_a_kernel_launch_inside_it(hf_reference, mamba_ops):
    with pytest.raises(AssertionError, match="_selective_scan_update_kernel"), hf_reference():
        mamba_ops.selective_state_update(torch.zeros(2, 2, 4, 8), torch.randn(2, 2, 4), torch.rand(2, 2, 4),
                                         -torch.ones(2, 4, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8),
                                         D=torch.ones(2, 4), dt_bias=torch.zeros(2, 4))


def test_guard_passes_torch_code(hf_reference):
    with hf_reference():
        torch.nn.functional.softplus(torch.randn(4)).sum()
