"""Warmup compiles what serving runs: after ModelRunner.warmup(), a serving mix of fresh, continued, batched
and packed (varlen) prefills, mixed prefill + decode steps and decodes of 1 to 64 rows compiles no new Triton
kernel variant, for any of the four architectures, in any of the report's servers (bf16 and fp32 state,
every autotune config or MAMBA_DETERMINISTIC's): compiling (and autotuning) there would stall the request."""

from __future__ import annotations

import pytest

# cold (nothing in TRITON_CACHE_DIR): every variant through ptxas, ~10 CPU-minutes for four architectures
pytestmark = pytest.mark.timeout(3600)


def test_serving_after_warmup_compiles_no_new_kernel_variant(compile_report):
    new = {f"{arch} {server}": run["new_after_warmup"]
           for arch, r in compile_report["archs"].items() for server, run in r["servers"].items()}
    assert {k: v for k, v in new.items() if v} == {}
    errors = {f"{arch} {server}": run["errors"]
              for arch, r in compile_report["archs"].items() for server, run in r["servers"].items()}
    assert {k: v for k, v in errors.items() if v} == {}
