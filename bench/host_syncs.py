"""Count the host syncs of a piece of work: the reads back to the host that stall a CUDA stream.

Counted, whatever device the tensors are on (so a CPU run counts what would sync on a GPU):
  - aten._local_scalar_dense: .item(), bool(), int(), float() of a tensor;
  - ops whose output shape depends on the data (nonzero, masked_select, unique, ...);
  - copies from another device to the CPU;
  - Tensor.tolist() / .numpy() / .cpu() calls, which do not pass the dispatcher (patched while counting).
Work inside a callable wrapped by `exempt` is not counted: fused kernels, which Triton's interpreter runs
by reading their tensors on the host, and which launch without a sync on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_DATA_DEPENDENT = {"nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive", "bincount",
                   "repeat_interleave"}  # (repeat_interleave with a tensor of repeats and no output_size)
_PATCHED = ("tolist", "numpy", "cpu")
_paused = [0]


@dataclass
class Syncs:
    by_kind: Counter = field(default_factory=Counter)

    @property
    def count(self) -> int:
        return sum(self.by_kind.values())


class _Mode(TorchDispatchMode):
    def __init__(self, out: Syncs) -> None:
        super().__init__()
        self.out = out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _paused[0]:
            name = func.overloadpacket.__name__
            if name == "_local_scalar_dense" or (name in _DATA_DEPENDENT and not (
                    name == "repeat_interleave" and kwargs.get("output_size") is not None)):
                self.out.by_kind[name] += 1
            elif name in ("_to_copy", "copy_") and _to_host(name, args, kwargs):
                self.out.by_kind["device_to_host"] += 1
        return func(*args, **kwargs)


def _to_host(name, args, kwargs) -> bool:
    if name == "_to_copy":
        dst = kwargs.get("device")
        return dst is not None and torch.device(dst).type == "cpu" and args[0].device.type != "cpu"
    return args[0].device.type == "cpu" and isinstance(args[1], torch.Tensor) and args[1].device.type != "cpu"


@contextlib.contextmanager
def count_syncs() -> Iterator[Syncs]:
    out = Syncs()
    saved = {m: getattr(torch.Tensor, m) for m in _PATCHED}

    def patched(method):
        @functools.wraps(method)
        def call(self, *a, **kw):
            if not _paused[0]:
                out.by_kind[method.__name__] += 1
            return method(self, *a, **kw)
        return call

    try:
        for m, fn in saved.items():
            setattr(torch.Tensor, m, patched(fn))
        with _Mode(out):
            yield out
    finally:
        for m, fn in saved.items():
            setattr(torch.Tensor, m, fn)


def exempt(fn: Callable) -> Callable:
    """fn with counting paused while it runs."""
    @functools.wraps(fn)
    def call(*a, **kw):
        _paused[0] += 1
        try:
            return fn(*a, **kw)
        finally:
            _paused[0] -= 1
    return call
