"""tests/compile: every Triton kernel the CUDA path launches, compiled for sm_80 / sm_86 / sm_89 / sm_90 on this
CPU (bench/compile_report.py), in its own pytest process (`make test` runs it after tests/triton):

- it needs real compilation: Triton's interpreter (TRITON_INTERPRET=1, which tests/triton needs set before
  triton is imported) would run the kernels instead of compiling them, so this process refuses it;
- compiling is CPU-heavy: TRITON_CACHE_DIR (make test: /var/tmp/granite-h-triton, kept between CI runs)
  holds the compiled variants, so a warm run only loads them (README: cold and warm cost).

A missing mamba-ssm or triton is a failure here, never a skip: `make install` installs both.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    raise pytest.UsageError("tests/compile compiles real cubins: run it without TRITON_INTERPRET=1 "
                            "(make test runs it in its own process)")


@pytest.fixture(scope="session")
def compile_report():
    """The report for the four architectures with this venv's triton (minutes cold, ~1 min warm)."""
    from bench import compile_report

    return compile_report.report()
