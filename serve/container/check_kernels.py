"""CUDA image check: the fused-kernel packages load against the installed torch.

Runs at image build time (no GPU there: it proves the wheels match torch's ABI and the Triton
kernels import) and can be rerun on a GPU host: `docker run --gpus all IMAGE python
/opt/program/serve/container/check_kernels.py`. It imports what the engine uses: causal-conv1d and
mamba-ssm's Triton submodules. mamba-ssm's compiled selective_scan_cuda (imported by
mamba_ssm/__init__.py, never used by the engine, optional in newer wheels) is reported, not required:
without it the Triton submodules are imported with the package registered but not executed, as
model/network/kernels.py does. Self-contained (the build stage has no project code).
"""

import importlib
import importlib.metadata
import importlib.util
import json
import sys
import types

TRITON_KERNELS = {
    "mamba_chunk_scan_combined": "mamba_ssm.ops.triton.ssd_combined",  # chunked SSD scan (prefill)
    "selective_state_update": "mamba_ssm.ops.triton.selective_state_update",  # one-token update (decode)
}


def load_triton_kernels() -> dict:
    """{function name: module file} for the mamba-ssm Triton kernels, and whether mamba_ssm/__init__ ran."""
    try:
        importlib.import_module("mamba_ssm")
        package_init = "ok"
    except Exception as e:  # noqa: BLE001 - a missing compiled extension: register the bare package
        package_init = f"skipped ({type(e).__name__}: {e})"
        spec = importlib.util.find_spec("mamba_ssm")
        if spec is None or not spec.submodule_search_locations:
            raise
        for key in [k for k in sys.modules if k == "mamba_ssm" or k.startswith("mamba_ssm.")]:
            del sys.modules[key]
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__, pkg.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules["mamba_ssm"] = pkg
    found = {}
    for fn, mod in TRITON_KERNELS.items():
        m = importlib.import_module(mod)
        assert callable(getattr(m, fn)), f"{mod}.{fn} missing"
        found[fn] = m.__file__
    return {"kernels": found, "mamba_ssm_init": package_init}


def main() -> None:
    import torch

    assert torch.version.cuda and torch.version.cuda.startswith("12."), \
        f"torch is not a CUDA 12 build: {torch.version.cuda}"
    # The prebuilt kernel wheels are the cxx11abiTRUE builds; a mismatch shows up as undefined symbols.
    assert torch.compiled_with_cxx11_abi(), "torch is not built with the C++11 ABI"
    importlib.import_module("triton")
    importlib.import_module("causal_conv1d_cuda")  # compiled extension of causal-conv1d
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update  # noqa: F401

    mamba = load_triton_kernels()
    report = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "mamba_ssm": importlib.metadata.version("mamba-ssm"),
        "mamba_ssm_init": mamba["mamba_ssm_init"],
        "selective_scan_cuda": importlib.util.find_spec("selective_scan_cuda") is not None,  # optional
        "causal_conv1d": importlib.metadata.version("causal-conv1d"),
        "triton": importlib.metadata.version("triton"),
    }
    if torch.cuda.is_available():
        report["device"] = torch.cuda.get_device_name(0)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
