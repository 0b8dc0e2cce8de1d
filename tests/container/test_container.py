"""The container test as a pytest test (`pytest -m container tests/container`).

tests/container/run.sh does the work (podman build of the CPU flavor, serve + batch against the
SageMaker contract); this wrapper gives CI a test result and keeps its log in the report.
Cold (no cached base image or wheelhouse): ~6-7 min on a 2-core machine; warm: ~1 min.
"""

import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).with_name("run.sh")


@pytest.mark.container
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_container_contract():
    proc = subprocess.run(["bash", str(RUN)], capture_output=True, text=True, cwd=RUN.parents[2])
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr[-20000:])
    assert proc.returncode == 0, f"tests/container/run.sh failed ({proc.returncode}); its output is above"
    assert "container test passed" in proc.stdout
    assert "serve-to-first-ping:" in proc.stdout and "size" in proc.stdout
