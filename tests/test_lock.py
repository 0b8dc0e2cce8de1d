"""The one lock (.ci/lock.txt, `make lock`) is what is installed, and the images' pins come from it.

Checked against the files and this process's own environment, offline: the suite runs in the venv that
`make install` synced from the lock, so a drifted venv, a stale lock or a hand-edited image pin fails here.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sysconfig
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / ".ci" / "lock.txt"
CPU_IMAGE = ROOT / "serve" / "container" / "requirements-cpu.txt"
CUDA_IMAGE = ROOT / "serve" / "container" / "constraints.txt"
# Not installed from the lock: the project itself (editable) and the mamba-ssm wheel built from its sdist.
NOT_LOCKED = {"granite-h-sagemaker", "mamba-ssm"}


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9._-]+)==(\S+)", line)
        if m:
            out[canonicalize_name(m[1])] = m[2]
    return out


def test_the_environment_is_exactly_the_lock():
    lock = pins(LOCK)
    # The venv's own site-packages, not sys.path: an earlier test may have put a package's vendored copies on it.
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in md.distributions(path=site)}
    wrong = {n: (v, installed.get(n)) for n, v in lock.items() if installed.get(n) != v}
    extra = sorted(set(installed) - set(lock) - NOT_LOCKED)
    assert not wrong, f"installed versions differ from the lock (lock, installed): {wrong}; run make install"
    assert not extra, f"installed but not in the lock: {extra}; run make install (it syncs exactly)"


def test_the_lock_satisfies_pyproject():
    """A pyproject edit without `make lock` leaves a requirement the lock does not meet."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock = pins(LOCK)
    for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in lock, f"{spec} is not in the lock: run make lock"
        version = Version(lock[name])
        # torch's CPU build carries a local version (2.13.0+cpu), which a specifier compares without it.
        assert req.specifier.contains(Version(version.public), prereleases=True), f"lock {name}=={version} vs {spec}"


def test_the_cpu_image_installs_the_locks_versions():
    lock, image = pins(LOCK), pins(CPU_IMAGE)
    assert "torch" in image and "transformers" in image
    assert {n: v for n, v in image.items() if lock.get(n) != v} == {}


def test_the_cuda_image_pins_the_locks_versions_but_its_own_torch():
    lock, image = pins(LOCK), pins(CUDA_IMAGE)
    assert "torch" not in image  # the Dockerfile pins the CUDA build (TORCH_VERSION)
    own = {"triton"}  # the CUDA torch's own triton; its CUDA libraries are not in the CPU lock at all
    assert {n: v for n, v in image.items() if n in lock and n not in own and lock[n] != v} == {}
    for runtime in ("transformers", "tokenizers", "safetensors", "flask", "gunicorn", "einops"):
        assert runtime in image, runtime


@pytest.mark.parametrize("name, arg", [("mamba-ssm", "MAMBA_SSM_VERSION"), ("causal-conv1d", "CAUSAL_CONV1D_VERSION")])
def test_kernel_versions_agree_between_makefile_and_dockerfile(name, arg):
    """The kernels are not in the lock (source-only packages): the Makefile's build and the image's wheels agree."""
    make = re.search(rf"{name}==(\S+)", (ROOT / "Makefile").read_text())
    docker = re.search(rf"ARG {arg}=(\S+)", (ROOT / "Dockerfile").read_text())
    assert make and docker and make[1] == docker[1], (make and make[1], docker and docker[1])


def test_the_image_never_fetches_hub_kernels():
    """transformers >= 5.25 requires the `kernels` package, which downloads kernels from the Hub by default."""
    env = re.search(r"^ENV ((?:.*\\\n)*.*)$", (ROOT / "Dockerfile").read_text().split("FROM ${FLAVOR}-deps")[1], re.M)
    assert env and "USE_HUB_KERNELS=NO" in env[1]
