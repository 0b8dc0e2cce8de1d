"""The projections' linear op and its per-row extra term (model/network/kernels.py picks the op per device;
model/network/granite.py's Linear applies the extra term where a projection has one)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def _onednn_linear(x, weight, bias):
    if x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def cpu_linear() -> Callable | None:
    """oneDNN's fp32 linear (the op Inductor's CPU fusions call) when this torch has it and it agrees with
    F.linear. torch's F.linear on CPU calls MKL, whose fp32 GEMM at decode's few rows runs 1.3-2.3x slower on
    this project's AMD EPYC VMs (mid checkpoint, 52 projections: 77 -> 46 ms at 1 row, 140 -> 80 ms at 8,
    399 -> 221 ms at 64; demo model 1.35x at 1 row, equal at 8). Same formula, another summation order."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=g) for s in ((3, 40), (24, 40), (24,)))
        if torch.allclose(_onednn_linear(x, w, b), F.linear(x, w, b), rtol=1e-4, atol=1e-5):
            return _onednn_linear
    except Exception as e:  # noqa: BLE001 - a torch without the op, or a broken build: MKL it is
        log.info("oneDNN linear unavailable: %r", e)
    return None


class LinearExtra(Protocol):
    """A per-row extra term on one projection's output (where a LoRA delta goes), set on the projection
    (model/network/granite.py Linear.extra). x (N, in) is the projection's input, y = linear(x, W, b) (N, out) its
    output, N the step's rows (packed prefill tokens or decode rows, model/runtime/runner.py's order); returns y with
    the delta added on the rows it covers (typically the rows of some RowGroups' groups, batched per group),
    every other row bit for bit as it came. It owns the step's row -> group mapping: whoever runs the step
    sets it before the forward (a CUDA graph replays whatever its fixed buffers hold). Unset (None, the
    default), the projection is linear alone: no op more, the same CUDA graph capture."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class RowGroups:
    """A step's row -> group mapping for per-row extra terms (a LoRA: group = adapter), built once per step
    before its forward is queued (the index copies are plain, blocking ones): the groups present (ids) and
    each one's rows ((n_g,) long, ascending, disjoint)."""

    ids: tuple[int, ...]
    rows: tuple[torch.Tensor, ...]

    @classmethod
    def of(cls, groups: Sequence[int | None], device) -> RowGroups:
        """groups[i]: row i's group, None for none -> the rows of each group, groups in first-seen order."""
        by: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            if g is not None:
                by.setdefault(g, []).append(i)
        return cls(tuple(by), tuple(torch.tensor(r, dtype=torch.long, device=device) for r in by.values()))
