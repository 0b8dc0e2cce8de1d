"""Shared fixtures: small deterministic Granite 4.0 H checkpoints built once per test session.

    tiny_ckpt      Path to the "tiny" preset (4 layers, hidden 64, vocab 512): use for most tests.
    demo_ckpt      Path to the "demo" preset (what `make serve` runs; ~11M params): use sparingly.
    ckpt_factory   ckpt_factory(preset="tiny", seed=0, **overrides) -> Path, cached per argument set.
    build_variant  plain function, importable as `from tests.conftest import build_variant`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from model.checkpoint.demo import build_checkpoint

# tests/triton runs the real Triton kernels under the interpreter, which must be switched on before any
# import of triton: it has its own pytest process (see tests/triton/conftest.py; `make test` runs both).
# tests/compile compiles them for real (no interpreter), minutes when cold: its own process too, run when
# named (`make test` does: tests/compile/conftest.py).
collect_ignore = ["compile"] + ([] if os.environ.get("TRITON_INTERPRET") == "1" else ["triton"])


def build_variant(out_dir, *, preset: str = "tiny", seed: int = 0, **overrides) -> Path:
    """A checkpoint with config overrides, e.g. build_variant(d, num_hidden_layers=6, attention_layers=(1, 4))."""
    return build_checkpoint(out_dir, preset=preset, seed=seed, **overrides)


@pytest.fixture(scope="session")
def ckpt_factory(tmp_path_factory):
    cache: dict[str, Path] = {}

    def make(preset: str = "tiny", seed: int = 0, **overrides) -> Path:
        key = json.dumps([preset, seed, overrides], sort_keys=True, default=str)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ckpt-{preset}")
            cache[key] = build_variant(out, preset=preset, seed=seed, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(ckpt_factory) -> Path:
    return ckpt_factory("tiny")


@pytest.fixture(scope="session")
def demo_ckpt(ckpt_factory) -> Path:
    return ckpt_factory("demo")


@pytest.fixture(autouse=True)
def own_snapshot_dir(tmp_path_factory, monkeypatch):
    """Every test's server gets its own disk tier folder (SNAPSHOT_DISK_DIR), never the shared /tmp default: a test
    must not find another test's (or another run's) snapshots and sessions there. In-process configs take the
    variable's default, subprocess servers the environment."""
    from serve import config

    folder = str(tmp_path_factory.mktemp("snapshots"))
    read = config.read
    monkeypatch.setattr(config, "read", lambda env: read({"SNAPSHOT_DISK_DIR": folder, **env}))
    monkeypatch.setenv("SNAPSHOT_DISK_DIR", folder)
