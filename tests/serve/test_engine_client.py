"""serve/engine_client.py: the real engine, its handle and tokenizer, and the test fakes all have every member
the Protocols name, with the same parameters, so neither the engine nor a fake drifts from what serve/ calls."""

import inspect

import pytest

from model.engine.engine import Engine
from model.engine.handle import Handle
from model.text.tokenizer import Tokenizer
from serve.engine_client import EngineClient, PromptTokenizer, RequestHandle
from tests.fakes import FakeTokenizer, fake_engine, req
from tests.serve.test_generate import ScriptedHandle


def members(proto: type) -> dict[str, object]:
    """A Protocol's own members: name -> the function, the property, or None for a data attribute."""
    out: dict[str, object] = {name: None for name in proto.__dict__.get("__annotations__", {})}
    for name, value in proto.__dict__.items():
        if (not name.startswith("_") or name == "__iter__") and (callable(value) or isinstance(value, property)):
            out[name] = value
    return out


def mismatches(proto: type, impl: type, instance: object | None = None) -> list[str]:
    """Where `impl` (a class; `instance` for its data attributes) differs from `proto`: a missing member, a
    method where a property is named (or the reverse), or parameters a call written against `proto` would
    not bind the same way (names, kinds, defaults; the implementation may add parameters with defaults)."""
    bad = []
    for name, want in members(proto).items():
        have = inspect.getattr_static(impl, name, None)
        if want is None or isinstance(want, property):  # data: a class attribute, a property, or set in __init__
            if have is None and not (instance is not None and hasattr(instance, name)):
                bad.append(f"{name}: missing")
            elif isinstance(want, property) and callable(have) and not isinstance(have, property):
                bad.append(f"{name}: a method, the Protocol reads it as a value")
            continue
        if not inspect.isfunction(have):
            bad.append(f"{name}: {'missing' if have is None else 'not a method'}")
            continue
        wp = list(inspect.signature(want).parameters.values())[1:]
        hp = list(inspect.signature(have).parameters.values())[1:]
        for p in wp:
            q = next((q for q in hp if q.name == p.name), None)
            if q is None or q.kind != p.kind or q.default != p.default:
                bad.append(f"{name}({p.name}): Protocol {p}, implementation {q}")
        if [p.name for p in wp] != [q.name for q in hp[:len(wp)]]:
            bad.append(f"{name}: parameters {[q.name for q in hp]}, Protocol {[p.name for p in wp]}")
        for q in hp[len(wp):]:
            if q.default is inspect.Parameter.empty and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD):
                bad.append(f"{name}({q.name}): required, not in the Protocol")
    return bad


def test_the_checker_sees_drift():
    class Drifted:
        model_name = "x"

        def submit(self, request, priority):  # an extra required parameter
            ...

        def stats(self, verbose=True):  # an extra parameter with a default is fine
            ...

        def wait_ready(self, timeout=5.0):  # another default
            ...

        def ready(self):  # a method where the Protocol reads a value
            ...

    bad = {line.split(":")[0] for line in mismatches(EngineClient, Drifted)}
    assert bad == {"model_dir", "config", "error", "tokenizer", "start", "shutdown", "session_conversation",
                   "submit_n",
                   "release_session", "register_adapter", "unregister_adapter", "list_adapters",  # missing
                   "ready",  # a method where a value is read
                   "submit(priority)",  # a required parameter the server does not pass
                   "wait_ready(timeout)"}  # another default; stats(verbose=True) is compatible


def test_the_real_engine_is_an_engine_client():
    eng = fake_engine()  # the real Engine class (scripted runner and tokenizer), started
    assert mismatches(EngineClient, Engine, eng) == []
    assert isinstance(eng, EngineClient)


def test_the_real_handle_is_a_request_handle():
    eng = fake_engine()
    h = eng.submit(req("ab", max_new_tokens=2))
    assert mismatches(RequestHandle, Handle, h) == []
    assert isinstance(h, RequestHandle)
    h.result()


def test_the_real_tokenizer_is_a_prompt_tokenizer():
    assert mismatches(PromptTokenizer, Tokenizer) == []


@pytest.mark.parametrize("proto, fake", [(PromptTokenizer, FakeTokenizer), (RequestHandle, ScriptedHandle)])
def test_the_fakes_match_the_protocols(proto, fake):
    instance = ScriptedHandle([]) if fake is ScriptedHandle else fake()
    assert mismatches(proto, fake, instance) == []
    assert isinstance(instance, proto)
