"""serve/container/check_kernels.py imports the engine's Triton kernels without selective_scan_cuda."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_triton_kernels_load_without_selective_scan_cuda():
    # the dev .venv holds the Triton-only mamba-ssm wheel (make install): no selective_scan_cuda there
    code = ("import importlib.util, json, runpy; "
            "assert importlib.util.find_spec('selective_scan_cuda') is None; "
            "m = runpy.run_path('serve/container/check_kernels.py', run_name='check'); "
            "print(json.dumps(m['load_triton_kernels']()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    assert rep["mamba_ssm_init"].startswith("skipped (")
    assert set(rep["kernels"]) == {"mamba_chunk_scan_combined", "selective_state_update"}
    assert all("mamba_ssm/ops/triton/" in f for f in rep["kernels"].values())
