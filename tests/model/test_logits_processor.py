"""The logits-processor seam (model/types.py LogitsProcessor, model/runtime/sampling.py Sampler.fill, model/runtime/runner.py
launch = forward -> fill -> sample): a processor's mask changes only its own row, everything after it (greedy,
sampled, penalties, logprobs, alternatives) sees the masked distribution, rows without one are bit for bit as
without the hook, and a decode step still reads the device back once."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.host_syncs import count_syncs
from model.runtime.runner import ModelRunner
from model.runtime.sampling import NEG_INF, Sampler
from model.types import EngineConfig, SamplingParams, SeqChunk, StepBatch, StepOutput, resolve_seed

V = 50


class Ban:
    """Bans a fixed token set on its row; keeps what each fill was given."""

    def __init__(self, banned) -> None:
        self.banned = sorted(banned)
        self.chunks: list[SeqChunk] = []
        self.all_true_on_entry: list[bool] = []

    def fill(self, allowed: torch.Tensor, chunk: SeqChunk) -> None:
        self.all_true_on_entry.append(allowed.shape == (allowed.numel(),) and bool(allowed.all()))
        allowed[self.banned] = False
        self.chunks.append(chunk)


class Quiet(Ban):
    """Ban without the checks (which read tensors on the host: counted as syncs)."""

    def fill(self, allowed: torch.Tensor, chunk: SeqChunk) -> None:
        allowed[self.banned] = False


PARAMS = [
    SamplingParams(top_n_tokens=3),  # greedy, alternatives
    SamplingParams(do_sample=True, temperature=0.8, seed=5, top_n_tokens=2),
    SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4),  # greedy with penalties
    SamplingParams(do_sample=True, top_k=8, top_p=0.9, seed=7),
    SamplingParams(do_sample=True, typical_p=0.7, presence_penalty=0.3, seed=11),
]


def _sampler(processors=None) -> Sampler:
    s = Sampler(len(PARAMS), V, "cpu")
    for i, p in enumerate(PARAMS):
        s.open(i, p, resolve_seed(p), (1, 2, 3), (processors or {}).get(i))
    return s


def _logits(step: int) -> torch.Tensor:
    return torch.randn(len(PARAMS), V, generator=torch.Generator().manual_seed(step)) * 3


def _chunks(tokens) -> list[SeqChunk]:
    return [SeqChunk.decode(i, t, 10) for i, t in enumerate(tokens)]


def _step(s: Sampler, x: torch.Tensor, chunks) -> StepOutput:
    slots = [c.slot for c in chunks]
    return s.unpack(s.sample(x, slots, s.fill(chunks)).tolist(), slots)


def _same(a: StepOutput, b: StepOutput, rows) -> bool:
    return all(a.token_ids[j] == b.token_ids[j] and a.logprobs[j] == b.logprobs[j] and a.top[j] == b.top[j]
               for j in rows)


@pytest.mark.parametrize("masked", [(1, 2), (0, 1, 2, 3, 4)])  # some rows (indexed) / every row (one op)
def test_mask_equals_banned_logits_at_minus_inf_and_leaves_other_rows(masked):
    """Row by row over several steps (generators and penalty state advancing): a processor's row samples
    exactly as a processor-free sampler given that row's banned tokens at -inf (greedy and sampled: tokens,
    logprobs, alternatives); the other rows exactly as a sampler without any processor."""
    bans = {j: Ban({(7 * j + 3 * k) % V for k in range(12)}) for j in masked}
    hooked, oracle, plain = _sampler(bans), _sampler(), _sampler()
    tokens = [5] * len(PARAMS)
    for step in range(6):
        x = _logits(step)
        xm = x.clone()
        for j, b in bans.items():
            xm[j, b.banned] = NEG_INF
        chunks = _chunks(tokens)
        got, want, free = _step(hooked, x, chunks), _step(oracle, xm, chunks), _step(plain, x, chunks)
        assert _same(got, want, range(len(PARAMS)))
        assert _same(got, free, [j for j in range(len(PARAMS)) if j not in bans])
        for j, b in bans.items():
            assert got.token_ids[j] not in b.banned and not {t for t, _ in got.top[j]} & set(b.banned)
            assert b.chunks[-1] == chunks[j] and all(b.all_true_on_entry)
        tokens = got.token_ids
    assert all(len(b.chunks) == 6 for b in bans.values())


def test_greedy_pick_moves_to_the_best_allowed_token_and_logprobs_see_the_masked_distribution():
    x = _logits(0)[:2]
    s = Sampler(2, V, "cpu")
    best = int(x[1].argmax())
    banned = sorted({best, *x[1].topk(5).indices.tolist()[2:]})
    for slot, proc in ((0, None), (1, Ban(banned))):
        s.open(slot, SamplingParams(top_n_tokens=4), None, (), proc)
    out = _step(s, x, _chunks([1, 1]))
    masked = x[1].clone()
    masked[banned] = NEG_INF
    logp = torch.log_softmax(masked, -1)
    assert out.token_ids == [int(x[0].argmax()), int(masked.argmax())] and out.token_ids[1] != best
    assert out.logprobs[1] == pytest.approx(float(logp.max()), abs=1e-6)
    vals, ids = logp.topk(4)
    assert [t for t, _ in out.top[1]] == ids.tolist()
    assert [v for _, v in out.top[1]] == pytest.approx(vals.tolist(), abs=1e-6)
    assert out.logprobs[0] == pytest.approx(float(torch.log_softmax(x[0], -1).max()), abs=1e-6)


def test_sampled_row_never_picks_a_banned_token():
    """The banned set holds most of the mass; a thousand draws of one seeded row never land in it."""
    x = torch.zeros(1, V)
    x[0, :10] = 6.0  # ~99.8% of the mass on tokens 0..9
    s = Sampler(1, V, "cpu")
    s.open(0, SamplingParams(do_sample=True, seed=3), None, (), Ban(range(10)))
    picks = [_step(s, x, _chunks([1])).token_ids[0] for _ in range(1000)]
    assert min(picks) >= 10 and len(set(picks)) > 20


def test_open_replaces_or_drops_the_slots_processor():
    s = Sampler(2, V, "cpu")
    s.open(0, SamplingParams(), None, (), Ban([1]))
    assert s.fill(_chunks([4])) is not None and s.fill([SeqChunk.decode(1, 4, 3)]) is None
    s.open(0, SamplingParams(), None, ())  # the slot's next sequence, without one
    assert s.processors == {} and s.fill(_chunks([4, 4])) is None


# ---- through the runner -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(ckpt_factory):
    return ckpt_factory("tiny", seed=3)


def _runner(ckpt, mode="eager") -> ModelRunner:
    cfg = EngineConfig(max_concurrent_seqs=4, max_input_tokens=32, max_total_tokens=64, kv_cache_tokens=512)
    return ModelRunner(ckpt, cfg, decode_mode=mode)


PROMPTS = [(5, 9, 14, 3), (7, 7, 21, 30, 2, 8), (11, 4)]
RUN_PARAMS = [SamplingParams(top_n_tokens=2), SamplingParams(do_sample=True, seed=9, top_n_tokens=2),
              SamplingParams(frequency_penalty=0.5)]


def _generate(r: ModelRunner, procs: dict, steps: int) -> list[StepOutput]:
    slots = [r.allocator.allocate(40) for _ in PROMPTS]
    for s, p, params in zip(slots, PROMPTS, RUN_PARAMS, strict=True):
        r.open(s, params, None, p, procs.get(s))
    outs = [r.step(StepBatch(tuple(SeqChunk.fresh(s, p, True) for s, p in zip(slots, PROMPTS, strict=True))))]
    for i in range(steps):
        chunks = tuple(SeqChunk.decode(s, t, len(p) + i) for s, t, p in
                       zip(slots, outs[-1].token_ids, PROMPTS, strict=True))
        outs.append(r.step(StepBatch(chunks)))
    for s in slots:
        r.allocator.free(s)
    return outs


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_runner_processor_changes_only_its_rows(ckpt, mode):
    """Slots 0 and 1 (greedy and sampled) with processors that ban the tokens the free run picked; slot 2
    without one is bit for bit the free run's; the banned tokens never come out."""
    free = _generate(_runner(ckpt, mode), {}, 6)
    bans = {0: Ban({o.token_ids[0] for o in free}), 1: Ban({o.token_ids[1] for o in free})}
    hooked = _generate(_runner(ckpt, mode), bans, 6)
    assert [o.token_ids[2] for o in hooked] == [o.token_ids[2] for o in free]
    assert [o.logprobs[2] for o in hooked] == [o.logprobs[2] for o in free]
    assert [o.top[2] for o in hooked] == [o.top[2] for o in free]
    for j in (0, 1):
        picks = [o.token_ids[j] for o in hooked]
        assert not set(picks) & set(bans[j].banned)
        assert not {t for o in hooked for t, _ in o.top[j]} & set(bans[j].banned)
        # the first fill sees the prompt's chunk, each later one the decode chunk feeding the last pick
        fed = [c.token_ids for c in bans[j].chunks]
        assert fed == [PROMPTS[j], *((t,) for t in picks[:-1])]


class OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _decode_batch(r: ModelRunner, params: list[SamplingParams], procs: dict):
    slots = [r.allocator.allocate(40) for _ in params]
    for s, p in zip(slots, params, strict=True):
        r.open(s, p, None, (3, 4), procs.get(s))
        r.forward(StepBatch((SeqChunk.fresh(s, (3, 4, 5), False),)))
    return StepBatch(tuple(SeqChunk.decode(s, 6, 3) for s in slots))


def test_without_a_processor_the_step_runs_todays_ops(ckpt):
    """No processor in the step (none at all, or only on a slot outside it): launch + collect run exactly the
    ops of forward + Sampler.sample + the read back, as before the split."""
    params = [SamplingParams(), SamplingParams(do_sample=True, seed=1, top_n_tokens=2)]
    logs = []
    for procs in ({}, {3: Ban([1])}):
        r = _runner(ckpt)
        batch = _decode_batch(r, params, procs)
        if procs:
            r.open(3, SamplingParams(), None, (), procs[3])
        with OpLog() as log:
            r.step(batch)
        logs.append(log.ops)
    r = _runner(ckpt)
    batch = _decode_batch(r, params, {})
    with OpLog() as today:
        slots = [c.slot for c in batch.chunks]
        r.sampler.sample(r.forward(batch), slots).tolist()
    assert logs[0] == logs[1] == today.ops


@pytest.mark.parametrize("with_processor", [False, True])
def test_decode_step_reads_the_device_back_once(ckpt, with_processor):
    params = [SamplingParams(), SamplingParams(do_sample=True, seed=2), SamplingParams(repetition_penalty=1.2)]
    r = _runner(ckpt)
    procs = {1: Quiet([4, 5, 6]), 2: Quiet([7])} if with_processor else {}
    batch = _decode_batch(r, params, procs)
    with count_syncs() as syncs:
        r.step(batch)
    assert syncs.count == 1 and dict(syncs.by_kind) == {"tolist": 1}
