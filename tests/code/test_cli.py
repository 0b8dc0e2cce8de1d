"""Every code/ script answers --help as a module (`python -m granite_sm.<name>`), without AWS credentials
or a region, and none of them edits sys.path."""

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
def test_help_as_module(name):
    r = subprocess.run([sys.executable, "-m", f"granite_sm.{name}", "--help"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage:") and "--region" in r.stdout


def test_help_from_the_code_folder_and_instance_table():
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-m", "granite_sm.deploy", "--help"], cwd=CODE, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for instance in ("ml.g5.xlarge", "ml.g6e.xlarge", "ml.p4d.24xlarge", "ml.p5.48xlarge"):
        assert instance in r.stdout


def test_no_script_edits_sys_path():
    import ast

    for path in sorted((CODE / "granite_sm").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            is_sys_path = isinstance(node, ast.Attribute) and node.attr == "path" and \
                isinstance(node.value, ast.Name) and node.value.id == "sys"
            assert not is_sys_path, f"{path.name}:{node.lineno} touches sys.path"
