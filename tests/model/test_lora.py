"""LoRA adapters through the engine (model/runtime/adapters.py, model/network/lora.py) against the oracle: peft
applied to Hugging Face's GraniteMoeHybridForCausalLM (fp32, the tiny random checkpoint, adapters with random
non-zero A and B on every supported target, saved by peft's save_pretrained). Greedy tokens are identical for each
adapter alone and for a batch mixing 3 adapters and base rows in the same steps, through chunked prefill and
decode; eager and static (the CUDA-graph path's fixed buffers) decode agree; fewer device slots than adapters
makes admission wait and reuse slots, with the same tokens."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from model.runtime.runner import ModelRunner
from model.types import (
    AdapterExists,
    AdapterInvalid,
    AdapterNotFound,
    EngineConfig,
    GenerationRequest,
    SamplingParams,
    SeqChunk,
    StepBatch,
)
from tests.fakes import ENGINES, check_pools_and_shut_down, real_engine
from tests.lora_helpers import ADAPTERS, greedy, make_adapter, peft_model

NEW = 10


@pytest.fixture(autouse=True)
def pools_free():
    ENGINES.clear()
    yield
    check_pools_and_shut_down(ENGINES)


@pytest.fixture(scope="module")
def adapters(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_ckpt, root / name, seed=i, **kw) for i, (name, kw) in enumerate(ADAPTERS.items())}


def _prompts(n, seed, lo=20, hi=45):
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module")
def cases(tiny_ckpt, adapters):
    """(adapter or None, prompt, peft's greedy tokens): each adapter twice and the base twice."""
    out = []
    ps = iter(_prompts(8, seed=11))
    for name in [*ADAPTERS, None]:
        m = peft_model(tiny_ckpt, adapters[name] if name else None)
        for _ in range(2):
            p = next(ps)
            out.append((name, p, greedy(m, p, NEW)))
    base = peft_model(tiny_ckpt, None)
    for name, p, ref in out:
        if name is not None and name != "ja":
            assert ref != greedy(base, p, NEW), f"adapter {name} changes nothing: the oracle would be vacuous"
    return out


def _engine(tiny_ckpt, adapters, **cfg):
    eng = real_engine(tiny_ckpt, **{**dict(max_loras=3, max_lora_rank=8, max_concurrent_seqs=8), **cfg})
    for name, path in adapters.items():
        info = eng.register_adapter(name, str(path))
        assert info["name"] == name and info["namespace"].startswith(name + "@")
    return eng


def _run(eng, name, prompt):
    return eng.submit(GenerationRequest(tuple(prompt), SamplingParams(max_new_tokens=NEW), adapter=name))


def test_each_adapter_alone_matches_peft(tiny_ckpt, adapters, cases):
    eng = _engine(tiny_ckpt, adapters)
    for name, p, ref in cases:
        assert list(_run(eng, name, p).result().token_ids) == ref, name


@pytest.mark.parametrize("max_loras", [3, 2])
def test_mixed_batch_matches_peft_through_chunked_prefill(tiny_ckpt, adapters, cases, max_loras):
    """All 8 at once (3 adapters, base rows), prefill in chunks of 16 with 64 tokens per step: they share steps.
    With 2 device slots for 3 adapters, the third adapter's sequences wait for a slot, then reuse one."""
    eng = _engine(tiny_ckpt, adapters, max_loras=max_loras)
    steps0 = eng.stats()["steps"]
    hs = [_run(eng, name, p) for name, p, _ in cases]
    for (name, _, ref), h in zip(cases, hs, strict=True):
        assert list(h.result().token_ids) == ref, name
    assert eng.stats()["steps"] - steps0 < len(cases) * NEW // 2  # rows really shared steps
    rep = eng.runner.adapters.report()
    assert rep["on_device"] <= max_loras
    if max_loras == 2:
        assert rep["device_loads_total"] >= 3  # a slot was reused


def test_lifecycle_errors_and_removal_while_running(tiny_ckpt, adapters, cases):
    eng = _engine(tiny_ckpt, {"fr": adapters["fr"]})
    with pytest.raises(AdapterExists, match="'fr'"):
        eng.register_adapter("fr", str(adapters["de"]))
    with pytest.raises(AdapterNotFound, match="'nope'"):
        _run(eng, "nope", [5, 6, 7])
    with pytest.raises(AdapterInvalid, match="not a folder"):
        eng.register_adapter("x", str(adapters["fr"] / "missing"))
    name, p, ref = cases[0]
    h = eng.submit(GenerationRequest(tuple(p), SamplingParams(max_new_tokens=60, ignore_eos=True), adapter="fr"))
    next(iter(h))  # running
    eng.unregister_adapter("fr")
    assert eng.list_adapters() == []
    with pytest.raises(AdapterNotFound):
        _run(eng, "fr", p)  # new requests refused
    c = h.result()  # the running one finishes, on its adapter
    assert list(c.token_ids[:NEW]) == ref and len(c.token_ids) == 60
    # then it is freed (check_pools_and_shut_down checks no hold, binding or entry is left) and may come back
    info = eng.register_adapter("fr", str(adapters["de"]))
    assert info["namespace"] != ""


def test_snapshots_are_per_adapter(tiny_ckpt, adapters, cases):
    """A finished sequence's snapshot is resumed by the next turn of the same adapter only."""
    eng = _engine(tiny_ckpt, {"fr": adapters["fr"], "de": adapters["de"]})
    p = cases[0][1]
    first = _run(eng, "fr", p).result()
    turn = p + list(first.token_ids) + [7, 8, 9]
    other = _run(eng, "de", turn).result()
    assert other.cached_tokens == 0  # never resumes fr's state
    same = _run(eng, "fr", turn).result()
    assert same.cached_tokens > 0
    ref = greedy(peft_model(tiny_ckpt, adapters["fr"]), turn, NEW)
    assert list(same.token_ids) == ref


def test_static_decode_equals_eager_with_mixed_adapters(tiny_ckpt, adapters):
    """The fixed-buffer decode (the CUDA-graph path, run eagerly here) with adapter indices as inputs equals eager."""
    cfg = EngineConfig(max_concurrent_seqs=4, max_input_tokens=32, max_total_tokens=64, kv_cache_tokens=512,
                       max_loras=3, max_lora_rank=8)
    outs = {}
    for mode in ("eager", "static"):
        r = ModelRunner(tiny_ckpt, cfg, decode_mode=mode)
        for name, path in adapters.items():
            r.adapters.register(name, str(path))
        names = ["fr", None, "ja", "de"]
        slots = [r.allocator.allocate(32) for _ in names]
        for s, n in zip(slots, names, strict=True):
            if n is not None:
                r.adapters.hold(n)
                r.adapters.bind(s, n)
        prompts = _prompts(4, seed=3, lo=3, hi=9)
        logits = [r.forward(StepBatch(tuple(SeqChunk.fresh(s, tuple(p), True) for s, p in zip(slots, prompts, strict=True))))]
        for k in range(3):
            logits.append(r.forward(StepBatch(tuple(SeqChunk.decode(s, 10 + k, len(p) + k)
                                                    for s, p in zip(slots, prompts, strict=True)))))
        outs[mode] = logits
    for e, s in zip(outs["eager"], outs["static"], strict=True):
        torch.testing.assert_close(s, e, atol=1e-4, rtol=1e-4)  # gathered vs segmented: summation order


def test_adapter_bytes_are_budgeted_before_the_kv_pool(tiny_ckpt):
    from model.checkpoint.adapters import target_shapes
    from model.network.lora import lora_bytes

    cfg = EngineConfig(max_concurrent_seqs=2, max_input_tokens=32, max_total_tokens=64, kv_cache_tokens=512,
                       max_loras=2, max_lora_rank=4)
    r = ModelRunner(tiny_ckpt, cfg)
    shapes = target_shapes(r.arch)
    real = sum(t.A.numel() * t.A.element_size() + t.B.numel() * t.B.element_size() for t in r.adapters.terms.values())
    assert real == lora_bytes(shapes, 2, 4, torch.float32) == r.memory_report()["lora_device_bytes"]
    assert len(r.adapters.terms) == 2 * r.arch.n_mamba + 4 * r.arch.n_attention + 2 * len(r.arch.kinds)


def test_threads_registering_and_submitting(tiny_ckpt, adapters, cases):
    eng = _engine(tiny_ckpt, {})
    errs = []

    def reg(name):
        try:
            eng.register_adapter(name, str(adapters[name]))
        except Exception as e:  # noqa: BLE001
            errs.append(e)

    ts = [threading.Thread(target=reg, args=(n,)) for n in ADAPTERS]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errs and sorted(a["name"] for a in eng.list_adapters()) == sorted(ADAPTERS)


def test_cpu_op_all_slots_equals_segmented_and_leaves_base_rows_exact():
    from model.network.lora import LoraStep, lora_all_slots, lora_cpu, lora_segmented

    g = torch.Generator().manual_seed(0)
    L, R, k, out = 3, 8, 24, 40
    A = torch.randn(L, R, k, generator=g)
    B = torch.randn(out, L, R, generator=g).permute(1, 0, 2)  # the stacks' layout
    x, y = torch.randn(7, k, generator=g), torch.randn(7, out, generator=g)
    step = LoraStep("cpu", L, R)
    step.set_rows([2, -1, 0, 0, 1, -1, 2])
    ref = lora_segmented(x, y, A, B, step.groups)
    got = lora_all_slots(x, y, A, B, step)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(got[[1, 5]], y[[1, 5]])
    assert torch.equal(lora_cpu(x, y, A, B, step), got)
    step.set_rows([-1, 1, 1, -1, -1, -1, -1])  # one group: the segmented op
    assert torch.equal(lora_cpu(x, y, A, B, step), lora_segmented(x, y, A, B, step.groups))


def test_demo_checkpoint_mixed_batch_matches_peft(demo_ckpt, tmp_path):
    """The demo checkpoint (what `make serve` runs: 8 layers, attention at 2 and 6): 3 adapters and a base row in
    the same steps, prefill in chunks of 16, equal to peft on HF's model."""
    paths = {n: make_adapter(demo_ckpt, tmp_path / n, seed=10 + i, **kw) for i, (n, kw) in enumerate(ADAPTERS.items())}
    ps = _prompts(4, seed=21, lo=20, hi=40)
    names = [*ADAPTERS, None]
    refs = [greedy(peft_model(demo_ckpt, paths[n] if n else None), p, 6) for n, p in zip(names, ps, strict=True)]
    eng = real_engine(demo_ckpt, max_loras=3, max_lora_rank=8, max_concurrent_seqs=4)
    for n, p in paths.items():
        eng.register_adapter(n, str(p))
    hs = [eng.submit(GenerationRequest(tuple(p), SamplingParams(max_new_tokens=6), adapter=n))
          for n, p in zip(names, ps, strict=True)]
    assert [list(h.result().token_ids) for h in hs] == refs


def test_host_tier_evicts_unused_adapters_and_reloads_them(tiny_ckpt, adapters, cases):
    """LORA_HOST_BYTES of 1: an adapter nobody uses leaves host memory at once; a request reads it again from its
    folder (checked again) and gets the same tokens."""
    eng = _engine(tiny_ckpt, {"fr": adapters["fr"]}, lora_host_bytes=1)
    rep = eng.runner.adapters.report()
    assert rep["host_bytes"] == 0 and rep["host_evictions_total"] == 1
    name, p, ref = cases[0]
    assert list(_run(eng, "fr", p).result().token_ids) == ref
    assert eng.runner.adapters.report()["host_loads_total"] == 1
