"""Build causal-conv1d's CUDA extension from its sdist for ONE GPU architecture, forward + update only.

    python bench/conv_build.py --sdist build/wheels/causal_conv1d-1.6.2.post1.tar.gz --site DIR [--arch 90]

Its setup.py compiles every architecture from sm_75 to sm_121 (the time of a release build), the backward
source too (causal_conv1d_bwd.cu: ~266 s alone for sm_90 with nvcc 13 on a 2-core VM) and needs ninja; this
drives nvcc directly instead: the two sources inference runs (causal_conv1d_fwd.cu, causal_conv1d_update.cu)
with the sdist's own nvcc flags but one -gencode (the local GPU's), compiled in parallel with the Python
binding, then linked against the running torch. The binding is the sdist's csrc/causal_conv1d.cpp with its
backward function and that function's `m.def` cut out, written into the build folder at build time
(`inference_binding`): the module then has no undefined backward symbol, and the package's Python side, which
looks `causal_conv1d_cuda.causal_conv1d_bwd` up only when a backward runs, imports as usual. The result is
DIR/causal_conv1d (the Python package) + DIR/causal_conv1d_cuda<ext>. `plan()` only writes the binding
(tested on CPU); `build()` returns {"ok": bool, "reason": ...} and never raises, so the caller can fall back
to the torch conv per op and say why.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

# what inference calls, longest first (they compile in parallel); the binding is generated (inference_binding)
SOURCES = ("csrc/causal_conv1d_fwd.cu", "csrc/causal_conv1d_update.cu")
BINDING = "causal_conv1d_infer.cpp"  # in the build folder, from csrc/causal_conv1d.cpp
# setup.py's nvcc flags, without its -gencode list and the verbose ptxas / lineinfo output
NVCC_FLAGS = ["-O3", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
              "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math"]
EXT = "causal_conv1d_cuda"
STAMP = ".causal_conv1d_build.json"  # in the site: what was built there (a rerun reuses it)


def unpack(sdist: Path, dest: Path) -> Path:
    """Extract the sdist (safe members only) -> its top directory."""
    with tarfile.open(sdist) as t:
        t.extractall(dest, filter="data")
    (top,) = [p for p in dest.iterdir() if p.is_dir() and p.name.startswith("causal_conv1d-")]
    return top


def inference_binding(src: Path, out_dir: Path) -> Path:
    """out_dir/BINDING: csrc/causal_conv1d.cpp minus the `causal_conv1d_bwd` definition (return type to closing
    brace) and its `m.def`. Raises ValueError when the sdist's file does not have that shape any more."""
    text = (src / "csrc" / "causal_conv1d.cpp").read_text()
    m = re.search(r"^void\s+causal_conv1d_bwd\s*\(", text, re.M)
    if m is None:
        raise ValueError("csrc/causal_conv1d.cpp: no `void causal_conv1d_bwd(` definition to cut")
    depth, end = 0, text.index("{", m.end())
    while True:  # to the matching closing brace
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            break
        end += 1
    text = text[:m.start()] + "// causal_conv1d_bwd: cut by bench/conv_build.py (inference only)\n" + text[end + 1:]
    text, defs = re.subn(r'^\s*m\.def\("causal_conv1d_bwd".*\n', "", text, flags=re.M)
    left = re.findall(r"\bcausal_conv1d(?:_channellast)?_bwd_cuda\s*<", text)
    kept = all(re.search(rf"^\s*m\.def\(\"{f}\"", text, re.M) for f in ("causal_conv1d_fwd", "causal_conv1d_update"))
    if defs != 1 or left or not kept:
        raise ValueError(f"csrc/causal_conv1d.cpp: backward cut left {len(left)} backward calls, removed {defs} m.def "
                         f"lines, forward/update bindings kept: {kept}")
    out = out_dir / BINDING
    out.write_text(text)
    return out


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
    """Compile and link commands (argv lists) for one architecture, e.g. arch "90" -> sm_90. Writes the
    generated binding (inference_binding) into out_dir; compiles nothing."""
    import torch
    import torch.utils.cpp_extension as ce

    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    defines = [f"-DTORCH_EXTENSION_NAME={EXT}", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    includes = [f"-I{p}" for p in [str(src / "csrc"), *_torch_paths("include"), str(Path(cuda_home) / "include"),
                                   sysconfig.get_paths()["include"]]]
    nvcc, std = str(Path(cuda_home) / "bin" / "nvcc"), f"-std={cxx_std()}"
    common = list(getattr(ce, "COMMON_NVCC_FLAGS", []))  # torch's own, before the sdist's (as setup.py)
    objs, compile_cmds = [], []
    for path in [*(src / rel for rel in SOURCES), inference_binding(src, out_dir)]:
        obj = out_dir / (path.name + ".o")
        objs.append(obj)
        if path.suffix == ".cu":
            cmd = [nvcc, "-c", str(path), "-o", str(obj), std, *common, *NVCC_FLAGS, "-gencode",
                   f"arch=compute_{arch},code=sm_{arch}", "-Xcompiler", "-fPIC", f"-ccbin={cxx}", *defines,
                   *includes]
        else:
            cmd = [cxx, "-c", str(path), "-o", str(obj), "-O3", std, "-fPIC", *defines, *includes]
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


def _stamp(sdist: Path, arch: str) -> dict:
    import torch

    return {"sdist": sdist.name, "arch": arch, "sources": [*SOURCES, BINDING], "torch": torch.__version__}


def build(sdist: Path, site: Path, work: Path, arch: str, timeout_s: float, log=print) -> dict:
    """Build into `site`; an earlier build of the same sdist, architecture and torch there is reused (reruns)."""
    t0 = time.monotonic()
    res: dict = {"ok": False, "arch": f"sm_{arch}", "timeout_s": timeout_s, "sources": [*SOURCES, BINDING]}
    try:
        stamp, stamp_file = _stamp(sdist, arch), site / STAMP
        target = site / (EXT + sysconfig.get_config_var("EXT_SUFFIX"))
        if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp and target.exists():
            res.update(ok=True, reason="reused the build of an earlier run", cached=True)
            return res
        cuda_home = find_cuda_home()
        cxx = shutil.which("c++") or shutil.which("g++")
        missing = [what for what, ok in (("nvcc (CUDA_HOME)", cuda_home), ("a C++ compiler", cxx),
                   ("Python.h", (Path(sysconfig.get_paths()["include"]) / "Python.h").exists())) if not ok]
        if missing:
            res["reason"] = f"cannot build: no {', '.join(missing)}"
            return res
        stamp_file.unlink(missing_ok=True)  # never leave an older build importable beside a failed one
        target.unlink(missing_ok=True)
        src = unpack(sdist, work)
        p = plan(src, work, arch, cuda_home, cxx)
        deadline = t0 + timeout_s
        err = _run_all(p["compile"], deadline, log) or _run_all([p["link"]], deadline, log)
        if err:
            res["reason"] = err
            return res
        site.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p["target"], target)
        shutil.rmtree(site / "causal_conv1d", ignore_errors=True)
        shutil.copytree(src / "causal_conv1d", site / "causal_conv1d")
        stamp_file.write_text(json.dumps(stamp))
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
    ap.add_argument("--timeout", type=float, default=90.0)
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
