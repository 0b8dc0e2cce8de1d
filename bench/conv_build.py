"""Build causal-conv1d's CUDA extension from its sdist for ONE GPU architecture, under a time cap.

    python bench/conv_build.py --sdist build/wheels/causal_conv1d-1.6.2.post1.tar.gz --site DIR [--arch 90]

Its setup.py compiles every architecture from sm_75 to sm_121 (the time of a release build) and needs
ninja; this drives nvcc directly instead: the four sources compiled in parallel with the sdist's own nvcc
flags but one -gencode (the local GPU's), then linked against the running torch. The result is
DIR/causal_conv1d (the Python package) + DIR/causal_conv1d_cuda<ext>. `plan()` is pure (tested on CPU);
`build()` returns {"ok": bool, "reason": ...} and never raises, so the caller can fall back to the torch
conv per op and say why.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

SOURCES = ("csrc/causal_conv1d_fwd.cu", "csrc/causal_conv1d_bwd.cu", "csrc/causal_conv1d_update.cu",
           "csrc/causal_conv1d.cpp")  # longest first: they run in parallel
# setup.py's nvcc flags, without its -gencode list and the verbose ptxas / lineinfo output
NVCC_FLAGS = ["-O3", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
              "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math"]
EXT = "causal_conv1d_cuda"


def unpack(sdist: Path, dest: Path) -> Path:
    """Extract the sdist (safe members only) -> its top directory."""
    with tarfile.open(sdist) as t:
        t.extractall(dest, filter="data")
    (top,) = [p for p in dest.iterdir() if p.is_dir() and p.name.startswith("causal_conv1d-")]
    return top


def _torch_paths(kind: str) -> list[str]:
    import torch.utils.cpp_extension as ce

    return list(ce.include_paths() if kind == "include" else ce.library_paths())  # torch's own (CPU) dirs


def cxx_std() -> str:
    """The C++ standard torch builds its extensions with (its headers need C++20 from about 2.10 on)."""
    import inspect

    import torch.utils.cpp_extension as ce

    return "c++20" if "-std=c++20" in inspect.getsource(ce) else "c++17"


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: torch's guess, $CUDA_HOME, /usr/local/cuda*, or nvcc's grandparent on PATH."""
    import glob

    import torch.utils.cpp_extension as ce

    nvcc = shutil.which("nvcc")
    cands = [ce.CUDA_HOME, os.environ.get("CUDA_HOME"), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"),
             reverse=True), str(Path(nvcc).resolve().parent.parent) if nvcc else None]
    for c in cands:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return c
    return None


def plan(src: Path, out_dir: Path, arch: str, cuda_home: str, cxx: str = "c++") -> dict:
    """Compile and link commands (argv lists) for one architecture, e.g. arch "90" -> sm_90."""
    import torch

    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    defines = [f"-DTORCH_EXTENSION_NAME={EXT}", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    includes = [f"-I{p}" for p in [str(src / "csrc"), *_torch_paths("include"), str(Path(cuda_home) / "include"),
                                   sysconfig.get_paths()["include"]]]
    nvcc, std = str(Path(cuda_home) / "bin" / "nvcc"), f"-std={cxx_std()}"
    import torch.utils.cpp_extension as ce

    common = list(getattr(ce, "COMMON_NVCC_FLAGS", []))  # torch's own, before the sdist's (as setup.py)
    objs, compile_cmds = [], []
    for rel in SOURCES:
        obj = out_dir / (Path(rel).name + ".o")
        objs.append(obj)
        if rel.endswith(".cu"):
            cmd = [nvcc, "-c", str(src / rel), "-o", str(obj), std, *common, *NVCC_FLAGS, "-gencode",
                   f"arch=compute_{arch},code=sm_{arch}", "-Xcompiler", "-fPIC", f"-ccbin={cxx}", *defines,
                   *includes]
        else:
            cmd = [cxx, "-c", str(src / rel), "-o", str(obj), "-O3", std, "-fPIC", *defines, *includes]
        compile_cmds.append(cmd)
    libs = [f"-L{p}" for p in _torch_paths("library")] + [f"-L{Path(cuda_home) / 'lib64'}"]
    target = out_dir / (EXT + sysconfig.get_config_var("EXT_SUFFIX"))
    link = [cxx, "-shared", *map(str, objs), "-o", str(target), *libs, "-lc10", "-lc10_cuda", "-ltorch",
            "-ltorch_cpu", "-ltorch_cuda", "-ltorch_python", "-lcudart"]
    return {"compile": compile_cmds, "link": link, "target": target}


def _run_all(cmds: list[list[str]], deadline: float, log) -> str | None:
    """Run commands in parallel (own process groups); kill all at the deadline. None = all succeeded."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for c in cmds]
    failed = None
    try:
        for c, p in zip(cmds, procs, strict=True):
            try:
                out, _ = p.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                return f"timed out compiling {Path(c[2] if c[1] == '-c' else c[-1]).name}"
            log(f"$ {' '.join(c)}\n{out[-4000:]}")
            if p.returncode != 0 and failed is None:
                failed = f"{Path(c[2]).name}: exit {p.returncode}: {out.strip().splitlines()[-1:] or ''}"
        return failed
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def build(sdist: Path, site: Path, work: Path, arch: str, timeout_s: float, log=print) -> dict:
    t0 = time.monotonic()
    res: dict = {"ok": False, "arch": f"sm_{arch}", "timeout_s": timeout_s}
    try:
        cuda_home = find_cuda_home()
        cxx = shutil.which("c++") or shutil.which("g++")
        missing = [what for what, ok in (("nvcc (CUDA_HOME)", cuda_home), ("a C++ compiler", cxx),
                   ("Python.h", (Path(sysconfig.get_paths()["include"]) / "Python.h").exists())) if not ok]
        if missing:
            res["reason"] = f"cannot build: no {', '.join(missing)}"
            return res
        src = unpack(sdist, work)
        p = plan(src, work, arch, cuda_home, cxx)
        deadline = t0 + timeout_s
        err = _run_all(p["compile"], deadline, log) or _run_all([p["link"]], deadline, log)
        if err:
            res["reason"] = err
            return res
        site.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p["target"], site / p["target"].name)
        shutil.rmtree(site / "causal_conv1d", ignore_errors=True)
        shutil.copytree(src / "causal_conv1d", site / "causal_conv1d")
        res.update(ok=True, reason="built", version=src.name.removeprefix("causal_conv1d-"))
        return res
    except Exception as e:  # noqa: BLE001 - any failure means "fall back to the torch conv"
        res["reason"] = f"{type(e).__name__}: {e}"
        return res
    finally:
        res["seconds"] = round(time.monotonic() - t0, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdist", type=Path, required=True)
    ap.add_argument("--site", type=Path, required=True, help="where the package and extension go")
    ap.add_argument("--work", type=Path, default=Path("build/conv1d"))
    ap.add_argument("--arch", default=None, help="e.g. 90 (default: the current GPU's compute capability)")
    ap.add_argument("--timeout", type=float, default=270.0)
    args = ap.parse_args(argv)
    if args.arch is None:
        import torch

        major, minor = torch.cuda.get_device_capability()
        args.arch = f"{major}{minor}"
    args.work.mkdir(parents=True, exist_ok=True)
    res = build(args.sdist, args.site, args.work, args.arch, args.timeout)
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
