"""model/network/fused_ops.py: importing mamba-ssm's Triton submodules without its compiled package init."""

from __future__ import annotations

import sys

from model.network import fused_ops
from model.network.fused_ops import FusedOps


def test_import_triton_submodule_without_package_init(tmp_path, monkeypatch):
    """mamba_ssm/__init__ fails (no compiled selective_scan_cuda): the Triton submodule still imports."""
    root = tmp_path / "mamba_ssm"
    (root / "ops" / "triton").mkdir(parents=True)
    (root / "__init__.py").write_text("import selective_scan_cuda_that_is_not_here\n")
    (root / "ops" / "__init__.py").write_text("")
    (root / "ops" / "triton" / "__init__.py").write_text("")
    (root / "ops" / "triton" / "ssd_combined.py").write_text(
        "from mamba_ssm.ops.triton.helper import VALUE\n"
        "def mamba_chunk_scan_combined(*a, **k):\n    return VALUE\n")
    (root / "ops" / "triton" / "helper.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = {k: v for k, v in sys.modules.items() if k.startswith("mamba_ssm")}
    try:
        for k in saved:
            del sys.modules[k]
        mod = fused_ops.import_mamba_triton("ssd_combined")
        assert mod.mamba_chunk_scan_combined() == 42
        ops = fused_ops.load_fused()
        assert ops.mamba_chunk_scan_combined is not None
        assert ops.selective_state_update is None and "selective_state_update" in ops.errors
    finally:
        for k in [k for k in sys.modules if k.startswith("mamba_ssm")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_fused_ops_dataclass_defaults():
    assert FusedOps().mamba_chunk_scan_combined is None
