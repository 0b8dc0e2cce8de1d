"""ModelRunner through its public interface: StepBatch in, float32 logits out (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

from model.network.decode_batch import BlockTables
from model.runtime.blocks import SlotAllocator
from model.runtime.decode_static import decode_buckets, needed_blocks, pick_bucket, width_buckets
from model.runtime.runner import ModelRunner
from model.types import EngineConfig, SeqChunk, StepBatch
from tests.tiny_granite import build_tiny

ATOL = 2e-5


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_runner")
    return d, build_tiny(d, seed=1)


def _cfg(**kw):
    base = dict(max_concurrent_seqs=5, max_input_tokens=48, max_total_tokens=64, kv_cache_tokens=512)
    base.update(kw)
    return EngineConfig(**base)


@pytest.fixture(params=["eager", "static"])
def runner(request, ckpt):
    return ModelRunner(ckpt[0], _cfg(), decode_mode=request.param)


def prompt_chunk(slot, ids, start, want_logits) -> SeqChunk:
    return (SeqChunk.cont if start else SeqChunk.fresh)(slot, ids, *((start,) if start else ()), want_logits)


def _generate(runner, prompt, new, chunk=None):
    """Greedy through the runner: chunked prefill, then one-token decode steps."""
    slot = runner.allocator.allocate(len(prompt) + new)
    chunk = chunk or len(prompt)
    logits = None
    for s in range(0, len(prompt), chunk):
        part = tuple(prompt[s:s + chunk])
        out = runner.forward(StepBatch((prompt_chunk(slot, part, s, s + len(part) == len(prompt)),)))
        logits = out if s + len(part) == len(prompt) else logits
        if s + len(part) < len(prompt):
            assert out.shape == (0, runner.vocab_size)
    toks = [int(logits.argmax(-1))]
    for i in range(new - 1):
        out = runner.forward(StepBatch((SeqChunk.decode(slot, toks[-1], len(prompt) + i),)))
        assert out.dtype == torch.float32 and out.shape == (1, runner.vocab_size)
        toks.append(int(out.argmax(-1)))
    runner.allocator.free(slot)
    return toks


def test_interface_fields(runner):
    assert runner.vocab_size == 320 and runner.device == "cpu" and runner.dtype == "float32"
    assert set(runner.kernel_report) >= {"ssd_prefill", "ssm_decode", "conv_prefill", "conv_decode", "attention"}
    assert runner.kernel_report["ssd_prefill"] == "reference"
    assert runner.allocator.num_free_slots == 5


@pytest.mark.parametrize("chunk", [None, 5, 8, 3])
def test_greedy_matches_hf_generate(runner, ckpt, chunk):
    hf = ckpt[1]
    for prompt in ([9, 8, 7], list(range(30, 51))):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
        assert _generate(runner, prompt, 10, chunk) == ref


def test_prefill_then_decode_logits_match_hf(runner, ckpt):
    hf = ckpt[1]
    prompt = list(range(60, 77))
    slot = runner.allocator.allocate(30)
    got = runner.forward(StepBatch((SeqChunk.fresh(slot, tuple(prompt), True),)))
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True)
        torch.testing.assert_close(got, out.logits[:, -1], atol=ATOL, rtol=1e-4)
        cache = out.past_key_values
        for i, tok in enumerate([3, 100, 7, 300]):
            out = hf(torch.tensor([[tok]]), cache=cache, use_cache=True)
            got = runner.forward(StepBatch((SeqChunk.decode(slot, tok, len(prompt) + i),)))
            torch.testing.assert_close(got, out.logits[:, -1], atol=ATOL, rtol=1e-4)


def test_mixed_step_rows_in_chunk_order(runner):
    """A step with decodes and prefill chunks returns logits rows in chunk order, only want_logits rows,
    and each equals running that sequence alone."""
    prompts = {"a": list(range(10, 25)), "b": [4, 5, 6, 7], "c": list(range(100, 111))}
    slots = {k: runner.allocator.allocate(40) for k in prompts}
    # a and b are already decoding; c starts now in two chunks.
    last = {}
    for k in ("a", "b"):
        last[k] = runner.forward(StepBatch((SeqChunk.fresh(slots[k], tuple(prompts[k]), True),)))
    ta, tb = int(last["a"].argmax()), int(last["b"].argmax())
    ca, cb, cc = len(prompts["a"]), len(prompts["b"]), prompts["c"]
    step = StepBatch((
        SeqChunk.fresh(slots["c"], tuple(cc[:6]), False),
        SeqChunk.decode(slots["b"], tb, cb),
        SeqChunk.decode(slots["a"], ta, ca),
    ))
    out1 = runner.forward(step)
    step2 = StepBatch((
        SeqChunk.decode(slots["a"], 7, ca + 1),
        SeqChunk.cont(slots["c"], tuple(cc[6:]), 6, True),
    ))
    out2 = runner.forward(step2)
    assert out1.shape == (2, runner.vocab_size) and out2.shape == (2, runner.vocab_size)
    # Replay each sequence alone in fresh slots.
    for k in slots:
        runner.allocator.free(slots[k])
    solo = {k: runner.allocator.allocate(40) for k in prompts}
    runner.forward(StepBatch((SeqChunk.fresh(solo["a"], tuple(prompts["a"]), True),)))
    runner.forward(StepBatch((SeqChunk.fresh(solo["b"], tuple(prompts["b"]), True),)))
    ref_b = runner.forward(StepBatch((SeqChunk.decode(solo["b"], tb, cb),)))
    ref_a = runner.forward(StepBatch((SeqChunk.decode(solo["a"], ta, ca),)))
    ref_a2 = runner.forward(StepBatch((SeqChunk.decode(solo["a"], 7, ca + 1),)))
    ref_c = runner.forward(StepBatch((SeqChunk.fresh(solo["c"], tuple(cc), True),)))
    torch.testing.assert_close(out1, torch.cat([ref_b, ref_a]), atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out2, torch.cat([ref_a2, ref_c]), atol=ATOL, rtol=1e-4)


def test_slot_reuse_starts_from_zero_state(runner):
    slot = runner.allocator.allocate(20)
    first = runner.forward(StepBatch((SeqChunk.fresh(slot, (1, 2, 3), True),)))
    runner.forward(StepBatch((SeqChunk.cont(slot, (50, 60, 70, 80), 3, True),)))
    runner.allocator.free(slot)
    slot2 = runner.allocator.allocate(20)
    assert slot2 == slot
    again = runner.forward(StepBatch((SeqChunk.fresh(slot2, (1, 2, 3), True),)))
    torch.testing.assert_close(again, first, atol=0, rtol=0)


def test_two_chunks_for_one_slot_is_an_error(runner):
    slot = runner.allocator.allocate(8)
    with pytest.raises(ValueError, match="one chunk per slot"):
        runner.forward(StepBatch((SeqChunk.fresh(slot, (1, 2), False), SeqChunk.decode(slot, 3, 2))))


def test_overrun_of_reservation_is_an_error(runner):
    slot = runner.allocator.allocate(4)  # one block of 16 tokens
    with pytest.raises(RuntimeError, match="exceed"):
        runner.forward(StepBatch((SeqChunk.fresh(slot, tuple(range(1, 18)), True),)))


def test_static_decode_equals_eager(ckpt):
    """The graph bookkeeping (buckets, dummy-slot padding, fixed buffers) gives eager's logits."""
    eager = ModelRunner(ckpt[0], _cfg(), decode_mode="eager")
    static = ModelRunner(ckpt[0], _cfg(), decode_mode="static")
    outs = []
    for r in (eager, static):
        slots = [r.allocator.allocate(40) for _ in range(3)]
        prompts = [list(range(3, 3 + n)) for n in (2, 17, 9)]
        for s, p in zip(slots, prompts, strict=True):
            r.forward(StepBatch((SeqChunk.fresh(s, tuple(p), False),)))
        rows = []
        for step in range(3):  # batch of 3 -> bucket 4, padded with the dummy slot
            chunks = tuple(SeqChunk.decode(s, 11 + step, len(p) + step) for s, p in zip(slots, prompts, strict=True))
            rows.append(r.forward(StepBatch(chunks)))
        outs.append(torch.cat(rows))
    torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=1e-4)
    assert set(static.static.buf) == {(4, 2)}  # batch 3 -> 4; longest position 19 -> 2 blocks of 16


def test_warmup_and_memory_report(ckpt):
    r = ModelRunner(ckpt[0], _cfg(), decode_mode="static")
    r.warmup()
    assert {(b, 1) for b in decode_buckets(5)} == {(1, 1), (2, 1), (4, 1), (5, 1)}
    assert set(r.static.buf) >= {(b, 1) for b in decode_buckets(5)}
    assert r.allocator.num_free_slots == 5 and r.allocator.num_free_blocks == r.allocator.num_blocks
    assert float(r.pool.ssm[:, r.pool.dummy_slot].abs().sum()) == 0.0
    rep = r.memory_report()
    a = r.arch
    state = a.n_mamba * (a.conv_dim * (a.m_conv - 1) + a.m_heads * a.m_head_dim * a.m_state) * 4
    kv = a.n_attention * 2 * a.n_kv_heads * a.head_dim * 4
    assert rep["state_bytes_per_seq"] == state and rep["kv_bytes_per_token"] == kv
    assert rep["formula_bytes_per_seq"] == state + kv * 64
    assert rep["kv_tokens"] == 512


def test_buckets_and_padding():
    assert decode_buckets(1) == [1]
    assert decode_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert decode_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    b = decode_buckets(48)
    assert [pick_bucket(n, b) for n in (1, 2, 3, 5, 17, 33, 48)] == [1, 2, 4, 8, 32, 48, 48]
    with pytest.raises(ValueError):
        pick_bucket(49, b)
    assert width_buckets(4) == [1, 2, 4] and width_buckets(1024)[-1] == 1024
    assert needed_blocks([0, 15], 16) == 1 and needed_blocks([16, 3], 16) == 2


def test_block_tables_on_device_follow_reallocation():
    alloc = SlotAllocator(3, 8, 4)
    bt = BlockTables(alloc, 3, 4, 99, "cpu")
    a, b = alloc.allocate(4), alloc.allocate(12)
    assert bt.sync([b, a]) == [alloc.block_table(b), alloc.block_table(a)]
    assert bt.rows(torch.tensor([a, b, 3]), 3).tolist() == [[0, 99, 99], [1, 2, 3], [99, 99, 99]]
    alloc.free(a)
    c = alloc.allocate(8)  # the same slot again, other blocks: uploaded again on the next sync
    assert c == a and alloc.block_table(c) != [0]
    bt.sync([c])
    assert bt.rows(slice(c, c + 1), 4).tolist() == [alloc.block_table(c) + [99, 99]]


def test_config_errors(ckpt):
    with pytest.raises(RuntimeError, match="CUDA"):
        ModelRunner(ckpt[0], _cfg(kernels="fused"))
    with pytest.raises(ValueError, match="CUDA graphs"):
        ModelRunner(ckpt[0], _cfg(), decode_mode="graph")
    r = ModelRunner(ckpt[0], _cfg(kv_cache_tokens=0, dtype="bfloat16", ssm_state_dtype="float32"))
    assert r.dtype == "bfloat16" and r.pool.ssm.dtype == torch.float32
    assert r.memory_report()["kv_tokens"] >= 5 * 64  # auto on CPU: slots x max_total_tokens


def test_ckpt_tiny_preset_matches_hf(tiny_ckpt):
    """The shared tiny checkpoint (model/checkpoint/demo.py) loads and matches HF's forward on it."""
    from transformers import GraniteMoeHybridForCausalLM

    hf = GraniteMoeHybridForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    r = ModelRunner(tiny_ckpt, _cfg())
    prompt = [int(t) for t in torch.randint(3, r.vocab_size, (37,), generator=torch.Generator().manual_seed(0))]
    slot = r.allocator.allocate(45)
    got = r.forward(StepBatch((SeqChunk.fresh(slot, tuple(prompt[:20]), False), )))
    got = r.forward(StepBatch((SeqChunk.cont(slot, tuple(prompt[20:]), 20, True),)))
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True)
        torch.testing.assert_close(got, out.logits[:, -1].float(), atol=1e-4, rtol=1e-4)
        out = hf(torch.tensor([[5]]), cache=out.past_key_values, use_cache=True)
    got = r.forward(StepBatch((SeqChunk.decode(slot, 5, 37),)))
    torch.testing.assert_close(got, out.logits[:, -1].float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype,ssm", [("bfloat16", "bfloat16"), ("bfloat16", "float32"), ("float32", "bfloat16")])
def test_low_precision_paths_run_and_stay_close(ckpt, dtype, ssm):
    ref = ModelRunner(ckpt[0], _cfg())
    low = ModelRunner(ckpt[0], _cfg(dtype=dtype, ssm_state_dtype=ssm), decode_mode="static")
    assert low.pool.ssm.dtype == getattr(torch, ssm) and low.pool.k.dtype == getattr(torch, dtype)
    outs = []
    for r in (ref, low):
        s = r.allocator.allocate(40)
        rows = [r.forward(StepBatch((SeqChunk.fresh(s, tuple(range(20, 33)), True),)))]
        rows += [r.forward(StepBatch((SeqChunk.decode(s, 5 + i, 13 + i),))) for i in range(4)]
        outs.append(torch.cat(rows))
    assert outs[1].dtype == torch.float32
    torch.testing.assert_close(outs[1], outs[0], atol=0.1, rtol=0.05)


@pytest.mark.parametrize("budget", [1 << 16, 60])
def test_packed_prefill_equals_one_at_a_time(ckpt, monkeypatch, budget):
    """One step with several prefill chunks (different lengths, some continuing from existing state and KV,
    across SSD chunk boundaries of 16) and decode rows gives the logits and final states of running each
    chunk alone; also when the key-row budget splits the chunks into several packed forwards. (The fused path:
    tests/triton/test_model_interp.py, with the real kernels.)"""
    from model.network import packed as packed_mod

    monkeypatch.setattr(packed_mod, "MAX_PACK_KEY_ROWS", budget)

    prompts = [list(range(3, 40)), list(range(50, 53)), list(range(60, 81)), list(range(90, 108)), [7, 8, 9, 10]]
    done = [10, 0, 17, 0, 4]  # tokens already in each slot before the step (seq 4 is decoding)
    results = []
    for packed in (True, False):
        r = ModelRunner(ckpt[0], _cfg())
        slots = [r.allocator.allocate(48) for _ in prompts]
        for s, p, n in zip(slots, prompts, done, strict=True):
            if n:
                r.forward(StepBatch((SeqChunk.fresh(s, tuple(p[:n]), True),)))
        chunks = [prompt_chunk(s, tuple(p[n:]), n, True) if n < len(p) else SeqChunk.decode(s, 11, n)
                  for s, p, n in zip(slots, prompts, done, strict=True)]
        chunks[3] = SeqChunk.fresh(slots[3], chunks[3].token_ids, False)  # a non-final chunk: no logits row
        if packed:
            logits = r.forward(StepBatch(tuple(chunks)))
        else:
            logits = torch.cat([r.forward(StepBatch((c,))) for c in chunks])
        assert logits.shape == (4, r.vocab_size)
        idx = torch.tensor(slots)
        results.append([logits, r.pool.conv[:, idx], r.pool.ssm[:, idx], r.pool.k, r.pool.v])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)


def test_pack_runs():
    from model.network.packed import pack_runs

    assert pack_runs([]) == []
    assert pack_runs([10, 20, 30], 100) == [range(0, 3)]
    assert pack_runs([50, 50, 50], 100) == [range(0, 2), range(2, 3)]
    # a long context alone; a single chunk always runs even past the budget
    assert pack_runs([10, 5000, 10, 10], 200) == [range(0, 1), range(1, 2), range(2, 4)]
