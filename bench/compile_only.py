"""Compile-only Triton on a CPU: every kernel launch compiles for a chosen GPU (GPUTarget("cuda", cc, 32)) with
the real Triton compiler (its bundled ptxas) and returns without running, so the wrappers' outputs stay garbage.

    with compile_only(90) as compiles:   # H100 = sm_90
        ...call the real wrappers / the runner on CPU tensors...
    compiles -> [(kernel name, CPU seconds, wall seconds), ...]: one per new variant (specialization x config)

How: Triton's active driver is replaced by one that only names the target (JITFunction.run asks it for the
target, device and stream), JITFunction.run always takes its `warmup=True` branch (compile, no launch) and
`_do_compile` is timed (CPU seconds of this process and its children, i.e. ptxas: what one idle core takes,
whatever else loads the machine; and wall seconds); `torch.cuda.device(None)` (the wrappers' CPU tensors have no index) is a null
context. Everything is restored on exit. A variant found in Triton's on-disk cache (TRITON_CACHE_DIR) is
loaded, not compiled: point it at an empty folder to time cold compiles.
"""

from __future__ import annotations

import contextlib
import resource
import time

import torch


class _TargetOnly:
    """What JITFunction.run asks the active driver for, and nothing that needs a GPU."""

    def __init__(self, target) -> None:
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def cpu_seconds() -> float:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


@contextlib.contextmanager
def compile_only(cc: int = 90, warp_size: int = 32):
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    compiles: list[tuple[str, float, float]] = []
    run, do_compile, old_active, old_device = JITFunction.run, JITFunction._do_compile, driver._active, torch.cuda.device

    def run_warmup(self, *args, grid, warmup, **kwargs):
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    def timed_compile(self, *args, **kwargs):
        t, cpu = time.perf_counter(), cpu_seconds()
        kernel = do_compile(self, *args, **kwargs)
        compiles.append((self.fn.__name__, cpu_seconds() - cpu, time.perf_counter() - t))
        return kernel

    driver.set_active(_TargetOnly(GPUTarget("cuda", cc, warp_size)))
    JITFunction.run, JITFunction._do_compile = run_warmup, timed_compile
    torch.cuda.device = lambda index: contextlib.nullcontext() if index is None else old_device(index)
    try:
        yield compiles
    finally:
        JITFunction.run, JITFunction._do_compile, torch.cuda.device = run, do_compile, old_device
        driver._active = old_active
