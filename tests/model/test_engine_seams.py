"""The engine's seams (the Protocols in model/types.py) against everything that implements them: the real
classes and the test fakes. Every member a Protocol names exists on an instance (attributes of a Protocol
type are checked against that Protocol in turn: a runner's allocator and snapshot copier), and every method
takes the Protocol's parameters (same names, order and kinds; any extra one only with a default), so neither
the runner nor a fake can drift from the seam the engine is written against."""

from __future__ import annotations

import inspect
import types
import typing
from pathlib import Path

import pytest

from model.runtime.blocks import SlotAllocator
from model.types import Allocator, Copier, Detokenizer, EngineConfig, Runner, SnapshotStore, Tokenizer
from tests import fakes

TESTS = Path(__file__).resolve().parents[1]
# a boto3.Session stand-in (tests/fakes.py); the CUDA hardware stand-in under torch's own checks (tests/fake_cuda.py)
NOT_SEAM_FAKES = {"FakeSession", "FakeCuda"}


def members(proto: type) -> tuple[dict[str, object], dict[str, typing.Callable]]:
    """(attribute name -> type hint, method name -> function) of a Protocol, properties counted as attributes."""
    hints = typing.get_type_hints(proto)
    attrs: dict[str, object] = {k: v for k, v in hints.items() if not k.startswith("_")}
    methods = {}
    for cls in proto.__mro__:
        if cls in (typing.Protocol, typing.Generic, object):
            continue
        for name, v in vars(cls).items():
            if name.startswith("_") or name in methods:
                continue
            if isinstance(v, property):
                attrs.setdefault(name, typing.get_type_hints(v.fget).get("return", object))
            elif inspect.isfunction(v):
                methods[name] = v
    return attrs, methods


def _is_protocol(t) -> bool:
    return isinstance(t, type) and getattr(t, "_is_protocol", False)


def drift(proto: type, obj: object, where: str = "") -> list[str]:
    """How `obj` differs from `proto`; [] when it implements it."""
    where = where or type(obj).__name__
    attrs, methods = members(proto)
    out = []
    for name, hint in attrs.items():
        if not hasattr(obj, name):
            out.append(f"{where}: no attribute {name!r}")
            continue
        value = getattr(obj, name)
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if value is None:
            if type(None) not in options:
                out.append(f"{where}.{name} is None")
            continue
        protos = [t for t in options if _is_protocol(t)]
        plain = tuple(t for t in options if isinstance(t, type) and not _is_protocol(t) and t is not type(None))
        if protos:
            out += drift(protos[0], value, f"{where}.{name}")
        elif plain and not isinstance(value, plain):
            out.append(f"{where}.{name} is a {type(value).__name__}, not {hint}")
    for name, fn in methods.items():
        impl = getattr(obj, name, None)
        if not callable(impl):
            out.append(f"{where}: no method {name}()")
            continue
        want = list(inspect.signature(fn).parameters.values())[1:]  # without self
        have = list(inspect.signature(impl).parameters.values())  # bound: without self
        for i, w in enumerate(want):
            h = have[i] if i < len(have) else None
            if h is None or h.name != w.name or h.kind != w.kind:
                out.append(f"{where}.{name}{inspect.signature(impl)}: parameter {i} should be {w.name!r}")
                break
        for h in have[len(want):]:
            if h.default is inspect.Parameter.empty and h.kind not in (h.VAR_POSITIONAL, h.VAR_KEYWORD):
                out.append(f"{where}.{name}: extra parameter {h.name!r} without a default")
    return out


def fake_classes() -> set[str]:
    """Names of the classes defined in tests/fakes.py and tests/fake_*.py."""
    import ast

    out = set()
    for path in [TESTS / "fakes.py", *TESTS.glob("fake_*.py")]:
        out |= {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)}
    return out


def test_the_real_runner_and_tokenizer_implement_their_seams(tiny_ckpt):
    from model.runtime.runner import ModelRunner
    from model.text.tokenizer import Tokenizer as RealTokenizer

    cfg = EngineConfig(device="cpu", dtype="float32", max_concurrent_seqs=2, max_input_tokens=32,
                       max_total_tokens=64, kv_cache_tokens=256, max_step_tokens=32)
    runner = ModelRunner(tiny_ckpt, cfg)
    assert runner.snapshot_copier is not None  # its allocator and copier are checked against their Protocols
    tok = RealTokenizer.from_dir(tiny_ckpt)
    assert drift(Runner, runner) + drift(Tokenizer, tok) + drift(Detokenizer, tok.detokenizer()) == []
    assert drift(Allocator, SlotAllocator(2, 8, 4)) == []
    from model.grammar.compiler import for_tokenizer
    from model.types import Constraint, GrammarCompiler, RowProcessor

    grammars = for_tokenizer(tok, runner.vocab_size)
    assert drift(GrammarCompiler, grammars) + drift(RowProcessor, grammars.processor(Constraint("json", ""))) == []


def test_the_disk_tier_implements_its_seam(tmp_path):
    from model.runtime.disk_tier import DiskTier

    tier = DiskTier(tmp_path, "identity", 1 << 20, bytes)
    assert drift(SnapshotStore, tier) == []
    tier.close()


def test_the_fakes_implement_the_same_seams():
    runner = fakes.FakeRunner(None, EngineConfig(max_concurrent_seqs=2))
    tok = fakes.FakeTokenizer()
    checked = {"FakeRunner": drift(Runner, runner), "FakeTokenizer": drift(Tokenizer, tok),
               "FakeDetok": drift(Detokenizer, tok.detokenizer()), "ListCopier": drift(Copier, fakes.ListCopier(2, 8))}
    assert {k: v for k, v in checked.items() if v} == {}
    # a new fake is either checked here or named as no seam's
    assert fake_classes() - NOT_SEAM_FAKES == set(checked)


@pytest.mark.parametrize("broken", ["missing", "renamed", "extra", "none", "nested"])
def test_drift_is_found(broken):
    runner = fakes.FakeRunner(None, EngineConfig(max_concurrent_seqs=2))
    if broken == "missing":
        runner.memory_report = None
    elif broken == "renamed":
        runner.open = lambda slot, params, seed, context: None
    elif broken == "extra":
        runner.launch = lambda batch, now: None
    elif broken == "none":
        runner.allocator = None
    else:
        runner.allocator = object()
    assert drift(Runner, runner)
