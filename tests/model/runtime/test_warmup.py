"""ModelRunner.warmup and static / graph decode: every reachable (batch, width) bucket prepared before the
server is ready, inside the memory budget, and nothing captured while serving (CPU: the static buffers run
eagerly; graph capture goes through a fake of the CudaGraphs seam that runs the captured step on replay)."""

from __future__ import annotations

import pytest
import torch

from model.runtime.decode_static import StaticDecode, needed_blocks, pick_bucket
from model.runtime.runner import ModelRunner
from model.types import EngineConfig, SeqChunk, StepBatch


class FakeOOM(RuntimeError):
    pass


class FakeGraphs:
    """capture(fn) records fn and returns it as the replay (a graph replays the captured step on the same
    buffers); `oom_after` captures raise like torch.cuda.OutOfMemoryError."""

    def __init__(self, oom_after: int | None = None) -> None:
        self.captured: list = []
        self.oom_after = oom_after
        self.capturing_allowed = True

    def capture(self, fn):
        assert self.capturing_allowed, "captured while serving"
        if self.oom_after is not None and len(self.captured) >= self.oom_after:
            raise FakeOOM("CUDA out of memory (injected)")
        fn()
        self.captured.append(fn)
        return fn

    def reserved_bytes(self) -> int:
        return 1000 * len(self.captured)

    @staticmethod
    def is_oom(e) -> bool:
        return isinstance(e, FakeOOM)


def _greedy(runner, prompts, new):
    slots = [runner.allocator.allocate(len(p) + new) for p in prompts]
    toks = []
    for s, p in zip(slots, prompts, strict=True):
        toks.append([int(runner.forward(StepBatch((SeqChunk.fresh(s, tuple(p), True),))).argmax())])
    for i in range(new - 1):
        out = runner.forward(StepBatch(tuple(SeqChunk.decode(s, t[-1], len(p) + i)
                                             for s, p, t in zip(slots, prompts, toks, strict=True))))
        for t, row in zip(toks, out, strict=True):
            t.append(int(row.argmax()))
    for s in slots:
        runner.allocator.free(s)
    return toks


def test_warmup_with_a_small_generation_budget(ckpt_factory):
    """max_total_tokens - max_input_tokens small, KV pool large: warmup's test sequence must stay inside
    max_total_tokens (it used the pool size and decoded past the widest graph width)."""
    d = ckpt_factory("tiny", mamba_chunk_size=256)  # the micro's SSD chunk: warmup's short prompt is 129
    # bench/gpu_bench.py's defaults (prompt 128, steps 64)
    cfg = EngineConfig(max_concurrent_seqs=2, max_input_tokens=129, max_total_tokens=256, kv_cache_tokens=2 * 256)
    r = ModelRunner(d, cfg, decode_mode="static")
    r.warmup()
    assert r.allocator.num_free_slots == 2 and r.allocator.num_free_blocks == r.allocator.num_blocks
    small = ModelRunner(d, EngineConfig(max_concurrent_seqs=2, max_input_tokens=8, max_total_tokens=16,
                                        kv_cache_tokens=512), decode_mode="static")
    small.warmup()
    eager = ModelRunner(d, small.config, decode_mode="eager")
    assert _greedy(small, [[5, 6, 7, 8, 9, 10, 11, 12]], 8) == _greedy(eager, [[5, 6, 7, 8, 9, 10, 11, 12]], 8)


def test_bucket_overflow_names_what_overflowed():
    with pytest.raises(ValueError, match="decode batch of 17 exceeds the largest bucket 16"):
        pick_bucket(17, [1, 2, 4, 8, 16])
    sd = StaticDecode(lambda *a: None, [1, 2], 9, 99, 2, 16, 4, "cpu", torch.float32, None)
    with pytest.raises(ValueError, match="block-table width of 3 exceeds the largest bucket 2"):
        sd.run(torch.tensor([1]), torch.tensor([0]), torch.tensor([40]), None, needed_blocks([40], 16))


def test_warmup_prepares_every_reachable_bucket_and_serving_prepares_none(tiny_ckpt):
    cfg = EngineConfig(max_concurrent_seqs=5, max_input_tokens=40, max_total_tokens=64, kv_cache_tokens=512)
    r = ModelRunner(tiny_ckpt, cfg, decode_mode="static")
    r.warmup()
    keys = {(b, w) for b in (1, 2, 4, 5) for w in (1, 2, 4)}  # 64 tokens = 4 blocks of 16
    assert set(r.static.keys()) == keys and r.static.prepared == keys
    assert r.static.report["prepared"] == 12 and r.static.report["left_out"] == []
    assert r.memory_report()["decode_graphs"]["prepared"] == 12 and r.kernel_report["decode_buckets"] == "12/12"
    bufs = {k: v["out"].data_ptr() for k, v in r.static.buf.items()}
    eager = ModelRunner(tiny_ckpt, cfg, decode_mode="eager")
    prompts = [list(range(3, 3 + n)) for n in (3, 17, 33, 9, 25)]
    assert _greedy(r, prompts, 20) == _greedy(eager, prompts, 20)
    assert r.static.unprepared_runs == 0
    assert {k: v["out"].data_ptr() for k, v in r.static.buf.items()} == bufs  # nothing allocated while serving


def test_graphs_captured_in_warmup_only_and_replayed(tiny_ckpt):
    cfg = EngineConfig(max_concurrent_seqs=3, max_input_tokens=40, max_total_tokens=64, kv_cache_tokens=512)
    r = ModelRunner(tiny_ckpt, cfg, decode_mode="static")
    r.static.graphs = graphs = FakeGraphs()
    r.warmup()
    assert len(graphs.captured) == len(r.static.keys()) == 3 * 3 and set(r.static.replay) == r.static.prepared
    assert r.static.report["mode"] == "graph" and r.static.report["pool_bytes"] == 9000
    graphs.capturing_allowed = False  # from here on a capture fails the test
    eager = ModelRunner(tiny_ckpt, cfg, decode_mode="eager")
    prompts = [list(range(7, 7 + n)) for n in (30, 2, 12)]
    assert _greedy(r, prompts, 12) == _greedy(eager, prompts, 12)
    assert r.static.unprepared_runs == 0


def test_capture_budget_and_out_of_memory_leave_buckets_to_eager(tiny_ckpt):
    from model.runtime.decode_static import capture_plan
    from model.runtime.state import BLOCK_SIZE, decode_step_bytes

    cfg = EngineConfig(max_concurrent_seqs=4, max_input_tokens=40, max_total_tokens=64, kv_cache_tokens=512)
    r = ModelRunner(tiny_ckpt, cfg, decode_mode="static")
    cost = lambda k: decode_step_bytes(r.arch, k[0], k[1] * BLOCK_SIZE, torch.float32)  # noqa: E731
    todo, over = capture_plan(r.static.keys(), cost, cost((2, 4)))
    assert todo[0] == (2, 4) and (4, 4) in over and (4, 1) in todo  # largest first; wide x many left out
    assert all(cost(k) <= cost((2, 4)) for k in todo) and all(cost(k) > cost((2, 4)) for k in over)
    r.static.graphs = graphs = FakeGraphs(oom_after=3)
    rep = r.static.prepare_all(cost, cost((4, 4)))
    assert len(graphs.captured) == 3 and rep["prepared"] == 3 and len(rep["left_out"]) == 6
    assert rep["stopped_by"].startswith("FakeOOM")
    graphs.capturing_allowed = False
    eager = ModelRunner(tiny_ckpt, cfg, decode_mode="eager")
    prompts = [[3, 4, 5], list(range(9, 40))]
    assert _greedy(r, prompts, 6) == _greedy(eager, prompts, 6)  # left-out buckets run eagerly, same tokens
    assert r.static.unprepared_runs > 0


def test_prefill_plan_covers_every_int_class_within_the_limits():
    """model/runtime/warmup.py: one prefill per form (fresh, continued, continued batch, packed varlen) and per Triton
    int class (1 / multiple of 16 / other) of tokens, chunks and batch that the limits reach; never beyond them."""
    from model.runtime.warmup import _cls, lengths, prefill_plan

    assert lengths(512, 256) == [1, 2, 16, 257, 272]  # (tokens, chunks): (1,1) (o,1) (16,1) (o,o) (16,o)
    assert lengths(8192, 256) == [1, 2, 16, 257, 272, 3841, 3856]  # + 16 chunks (o,16) (16,16)
    plan = prefill_plan(256, 512, 2048, 64)
    fresh = [s for s in plan if len(s) == 1 and s[0][0] == 0]
    cont = [s for s in plan if all(start > 0 for start, _ in s)]
    varlen = [s for s in plan if len(s) > 1 and all(start == 0 for start, _ in s)]
    assert len(fresh) + len(cont) + len(varlen) == len(plan)
    assert {_cls(len(s)) for s in cont} == {1, 0, 16}  # batch 1, 2, 16
    assert {(_cls(sum(n for _, n in s)), _cls(-(-sum(n for _, n in s) // 256))) for s in varlen} == {
        (0, 1), (16, 1), (0, 0), (16, 0)}
    assert all(sum(n for _, n in s) <= 2048 and max(n for _, n in s) <= 512 for s in plan)
    small = prefill_plan(16, 8, 24, 2)  # tiny limits: nothing serving could not run
    assert all(len(s) <= 2 and sum(n for _, n in s) <= 24 and max(n for _, n in s) <= 8 for s in small)
