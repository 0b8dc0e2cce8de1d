"""Compile Triton kernels for the CUDA GPUs SageMaker serves on, on a machine without a GPU.

Triton bundles `ptxas` and `cuobjdump`, so a kernel compiles to a real cubin anywhere; only Triton's driver
(target, current device, launch) needs a GPU. `compile_only(arch)` makes Triton's active driver one whose
target is `GPUTarget("cuda", arch.cc, 32)` and whose launch does nothing, and leaves the rest of Triton
alone: our call sites run unchanged on `meta` tensors (shapes, strides, dtypes, no memory) and every
`kernel[grid](...)` compiles the specialization a GPU would. Triton keys a specialization on dtypes,
constexprs, ints equal to 1 and the 16-divisibility of ints and pointers; a meta tensor's data_ptr() is
its byte offset, so a view keeps its alignment class (allocations are at least 16-aligned on a GPU too).

Launch goes through Triton's own CompiledKernel._init_handles, which checks shared memory and threads
against this driver's device (raising OutOfResources as on the GPU, which the real Autotuner scores as an
unusable config); the benchmarker handed to the Autotuner compiles and "launches" each config and scores
every usable one the same, so autotuning compiles every config and keeps the first usable one (a GPU keeps
the fastest, unknown here: TuneEveryCall compiles every config on every call instead). Registers
and spills are read from the cubin with cuobjdump, as the CUDA driver reports them (spills = local memory
bytes / 4, CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES in Triton's driver.c).

Hardware calls faked while active: torch.cuda's set/exchange-device (a `torch.cuda.device(i)` block in
every upstream wrapper); torch's own argument checks run as they are. Works with triton 3.6 and 3.7.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, KernelInterface


@dataclass(frozen=True)
class Arch:
    cc: int  # compute capability, e.g. 86
    gpu: str
    instance: str  # the SageMaker instance family
    smem: int  # max dynamic shared memory per block (opt-in), bytes: what Triton checks at load
    sms: int


ARCHS = (Arch(80, "A100", "p4d", 166912, 108), Arch(86, "A10G", "g5", 101376, 80),
         Arch(89, "L40S", "g6e", 101376, 142), Arch(90, "H100", "p5", 232448, 132))
REGS_PER_BLOCK = 65536  # sm_80..sm_90


def arch(name: str | int) -> Arch:
    cc = int(str(name).removeprefix("sm_"))
    return next(a for a in ARCHS if a.cc == cc)


_USAGE: dict[str, tuple[int, int]] = {}


def usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, spills) of a cubin, from cuobjdump (~5 ms); cached per cubin."""
    key = hashlib.sha256(cubin).hexdigest()
    if key not in _USAGE:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                                 capture_output=True, text=True, check=True).stdout
        m = re.search(r"REG:(\d+) STACK:\d+ SHARED:\d+ LOCAL:(\d+)", out)
        if m is None:
            raise RuntimeError(f"cuobjdump gave no resource usage: {out!r}")
        _USAGE[key] = (int(m.group(1)), int(m.group(2)) // 4)
    return _USAGE[key]


def max_threads(regs: int) -> int:
    """CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK from registers: per-thread count rounded up to 8, per warp to
    256, 64K registers per block, at most 1024 threads."""
    per_warp = -(-(-(-regs // 8) * 8 * 32) // 256) * 256
    return min(1024, REGS_PER_BLOCK // max(per_warp, 1) * 32)


class _NoLaunch:
    def __init__(self, src, metadata) -> None:
        pass

    def __call__(self, *args) -> None:
        pass


def bench_compile_only(kernel_call, quantiles=None, **_):
    """The Autotuner's benchmarker: compile and load (shared-memory check) one config; every usable config
    scores the same (unusable ones raise OutOfResources, which the Autotuner scores as inf)."""
    kernel_call()
    return [1.0, 1.0, 1.0] if quantiles else 1.0


class CompileOnlyDriver:
    """Triton's driver interface for one architecture, with no device behind it."""

    def __init__(self, a: Arch, device: int) -> None:
        self.arch, self.device = a, device
        self.utils, self.launcher_cls = self, _NoLaunch

    @staticmethod
    def is_active() -> bool:
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp
        return ty_to_cpp(ty)

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch.cc, 32)

    def get_current_device(self) -> int:
        return self.device

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_benchmarker(self):
        return bench_compile_only

    def get_device_properties(self, device) -> dict:
        return {"max_shared_mem": self.arch.smem, "max_num_regs": REGS_PER_BLOCK, "multiprocessor_count":
                self.arch.sms, "warpSize": 32, "sm_clock_rate": 0, "mem_clock_rate": 0, "mem_bus_width": 0}

    def load_binary(self, name, cubin, shared, device):
        """(module, function, n_regs, n_spills, n_max_threads): Triton checks the threads against the last."""
        regs, spills = usage(cubin)
        return 0, 0, regs, spills, max_threads(regs)


def _kernels() -> list:
    """Every kernel object (JITFunction, and the Autotuner / Heuristics wrapping one) reachable from a loaded
    mamba_ssm or model module: those are the kernels our call sites launch."""
    found: dict[int, object] = {}
    for name, mod in list(sys.modules.items()):
        if not name.startswith(("mamba_ssm.", "model.")) or mod is None:
            continue
        for obj in list(vars(mod).values()):
            while isinstance(obj, KernelInterface):
                found[id(obj)] = obj
                obj = getattr(obj, "fn", None)
    return list(found.values())


def autotuners() -> list[Autotuner]:
    return [k for k in _kernels() if isinstance(k, Autotuner)]


def jit_functions() -> dict[str, JITFunction]:
    """The JIT functions by "module:name"."""
    return {f"{k.module}:{k.fn.__name__}": k for k in _kernels() if isinstance(k, JITFunction)}


class TuneEveryCall(dict):
    """An Autotuner.cache that holds no key before a call asks (what the call stores it reads back at once):
    every call autotunes, so every config compiles for every specialization of the kernel, not only the
    pick its autotune key got first. A GPU's pick (the fastest config) is unknown here; this shows whether
    any pick could fail to launch on a later call with other strides or sizes."""

    def __contains__(self, key) -> bool:
        return False


@contextlib.contextmanager
def compile_only(a: Arch, device: int | None = None, every_config: bool = False):
    """Within: Triton compiles for `a` and launches nothing. `device` (default a.cc) keys Triton's in-memory
    kernel cache (JITFunction.device_caches), so each architecture, or pass, keeps its own variants.
    Autotuning results are per process, not per device: they are cleared on entry and exit.
    every_config: autotune on every call (TuneEveryCall)."""
    prev = driver._active  # noqa: SLF001 - DriverConfig has no public getter that does not create a driver
    exchange, maybe_exchange = torch.cuda._exchange_device, torch.cuda._maybe_exchange_device
    driver.set_active(CompileOnlyDriver(a, a.cc if device is None else device))
    # cudaSetDevice / cudaGetDevice behind torch.cuda.device(i): no device to switch to
    torch.cuda._exchange_device = torch.cuda._maybe_exchange_device = lambda idx: -1
    caches = {t: t.cache for t in autotuners()}
    for t in caches:
        t.cache = TuneEveryCall() if every_config else {}
    try:
        with triton.knobs.compilation.scope():
            # the cache keeps cubin + metadata, not the IR stages (~650 KB -> ~100 KB per variant)
            triton.knobs.compilation.store_binary_only = True
            yield
    finally:
        for t, cache in caches.items():
            t.cache = cache
            cache.clear()
        torch.cuda._exchange_device, torch.cuda._maybe_exchange_device = exchange, maybe_exchange
        driver.set_active(prev)


def compiled(device: int) -> dict[str, dict]:
    """The in-memory kernel cache of each JIT function for `device`: {name: {specialization key: kernel}}."""
    out = {}
    for name, fn in jit_functions().items():
        cache = fn.device_caches.get(device)  # (a defaultdict: .get creates nothing)
        if cache and cache[0]:
            out[name] = dict(cache[0])
    return out


def variant_facts(kernel, a: Arch) -> dict:
    """Shared memory, registers, spills, and whether this variant can load on `a`."""
    regs, spills = usage(kernel.asm["cubin"])
    md = kernel.metadata
    usable = md.shared <= a.smem and md.num_warps * 32 <= max_threads(regs)
    return {"smem": md.shared, "regs": regs, "spills": spills, "warps": md.num_warps, "stages": md.num_stages,
            "usable": usable}
