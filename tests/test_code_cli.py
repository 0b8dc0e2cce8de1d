"""Every code/ script answers --help both as a file and as a module, without AWS credentials or a region."""

import os
import subprocess
import sys

import pytest

from tests.sdk_helpers import CODE, ROOT

SCRIPTS = ["package", "deploy", "invoke", "batch_transform", "scale", "cleanup"]


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PYTHONPATH"] = str(CODE)
    return env


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_as_file(name):
    r = subprocess.run([sys.executable, str(CODE / "granite_sm" / f"{name}.py"), "--help"], cwd=ROOT,
                       env={k: v for k, v in _env().items() if k != "PYTHONPATH"}, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage:") and "--region" in r.stdout


def test_help_as_module_and_instance_table():
    r = subprocess.run([sys.executable, "-m", "granite_sm.deploy", "--help"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for instance in ("ml.g5.xlarge", "ml.g6e.xlarge", "ml.p4d.24xlarge", "ml.p5.48xlarge"):
        assert instance in r.stdout


def test_script_folder_does_not_shadow_other_modules():
    """Run as a file, a script must take code/granite_sm off sys.path (its invoke.py would shadow the PyPI
    `invoke` package that the SageMaker SDK's dependencies import) and put code/ there instead."""
    script = CODE / "granite_sm" / "invoke.py"
    probe = ("import runpy, sys\n"
             "sys.argv = [sys.argv[1], '--help']; sys.path[0] = str(__import__('pathlib').Path(sys.argv[0]).parent)\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print(sys.path[0]); print(any(p.endswith('granite_sm') for p in sys.path))\n")
    r = subprocess.run([sys.executable, "-c", probe, str(script)], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-2:] == [str(CODE), "False"]
