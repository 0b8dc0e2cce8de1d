"""Constrained decoding through the real Engine on the tiny checkpoint's random weights (demo tokenizer, fp32, CPU).

The suite of issue 19: 200 constrained requests (25 JSON schemas, 8 regexes, forced and automatic tool calls),
greedy and sampled (with the sampling processors after the mask), streamed and not, batched with free rows in the
same steps: every finished output parses and validates (jsonschema), regex outputs are full matches, forced tool
calls name a declared tool with valid arguments; outputs cut by max_new_tokens are counted apart and >= 95% of
the bounded schemas' outputs finish within 512 tokens. Parity with Hugging Face (fp32 greedy) for free rows
beside constrained ones and for a constraint that allows every token HF picks (fresh, resumed from the prefix
cache, in a session). Bad input is a GrammarError from submit and the engine keeps serving; a cancelled
constrained request frees its matcher; a decode step with constrained rows still reads the device back once."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
import torch

from bench.grammar_cases import REGEXES, SCHEMAS, TOOLS, canonical, tool_specs
from bench.host_syncs import count_syncs
from model.types import Constraint, FinishReason, GenerationRequest, GrammarError, SamplingParams
from tests.fakes import ENGINES, check_pools_and_shut_down, fake_engine, real_engine

MAX_NEW = 512
CALL = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.DOTALL)
CALLS = re.compile(r"<tool_call>\n.*?\n</tool_call>(\n<tool_call>\n.*?\n</tool_call>)*", re.DOTALL)


@pytest.fixture(autouse=True)
def nothing_leaks():
    ENGINES.clear()
    yield
    check_pools_and_shut_down(ENGINES)


def engine(ckpt, **cfg):
    base = dict(max_concurrent_seqs=16, max_input_tokens=64, max_total_tokens=640, kv_cache_tokens=16 * 640,
                max_step_tokens=256, prefill_chunk_tokens=64, max_queued_requests=300)
    return real_engine(ckpt, **{**base, **cfg})


def prompt(rng: random.Random) -> tuple[int, ...]:
    return tuple(rng.randrange(9, 512) for _ in range(rng.randint(3, 20)))


SAMPLED = [SamplingParams(do_sample=True, temperature=1.0), SamplingParams(do_sample=True, temperature=0.7, top_k=50),
           SamplingParams(do_sample=True, top_p=0.9, repetition_penalty=1.2),
           SamplingParams(do_sample=True, temperature=1.3, presence_penalty=0.5)]


def params(i: int, seed: int, max_new: int) -> SamplingParams:
    base = SamplingParams() if i % 2 == 0 else SAMPLED[(i // 2) % len(SAMPLED)]
    return SamplingParams(**{**base.__dict__, "max_new_tokens": max_new, "seed": seed if not base.greedy else None})


def validator(schema):
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def check_calls(text: str, tools: list[dict]) -> None:
    assert CALLS.fullmatch(text), text
    byname = {t["name"]: t for t in tools}
    for body in CALL.findall(text):
        call = json.loads(body)
        assert list(call) == ["name", "arguments"] and call["name"] in byname, body
        validator(byname[call["name"]]["parameters"]).validate(call["arguments"])


@pytest.mark.slow  # ~2-9 min on the shared 2-core VM
def test_200_constrained_requests_on_random_weights_all_valid(tiny_ckpt):
    rng = random.Random(19)
    cases = []  # (kind, payload, constraint)
    for name, schema, bounded in SCHEMAS:  # 25 x 6 = 150
        cases += [("json", (name, schema, bounded), Constraint("json", canonical(schema)))] * 6
    for rx in REGEXES:  # 8 x 3 = 24
        cases += [("regex", rx, Constraint("regex", rx))] * 3
    cases += [("calls", TOOLS, Constraint("tool_calls", tools=tool_specs()))] * 10  # required, parallel
    cases += [("calls", TOOLS, Constraint("tool_calls", tools=tool_specs(), parallel=False))] * 6
    cases += [("calls", TOOLS[i:i + 1], Constraint("tool_calls", tools=tool_specs(TOOLS[i:i + 1]), parallel=False))
              for i in range(5)]  # a named function
    cases += [("auto", TOOLS, Constraint("tool_calls", tools=tool_specs(), tool_mode="auto"))] * 5
    assert len(cases) >= 200 and len(SCHEMAS) >= 20
    order = list(range(len(cases)))
    rng.shuffle(order)
    eng = engine(tiny_ckpt, max_concurrent_seqs=32, kv_cache_tokens=32 * 640)
    handles, free = [], []
    for n, i in enumerate(order):
        kind, payload, c = cases[i]
        # the 512-token budget where the grammar is bounded; unbounded ones are counted apart when cut anyway
        max_new = MAX_NEW if kind in ("regex", "calls") or (kind == "json" and payload[2]) else 96
        handles.append((kind, payload, eng.submit(GenerationRequest(prompt(rng), params(n, n, max_new),
                                                                    constraint=c))))
        if n % 7 == 0:  # free rows in the same steps
            free.append(eng.submit(GenerationRequest(prompt(rng), SamplingParams(max_new_tokens=24, ignore_eos=True))))
    cut = {"bounded": 0, "unbounded": 0}
    bounded_total = 0
    for n, (kind, payload, h) in enumerate(handles):
        if n % 3 == 0:  # streamed: the events' text is the result's
            events = list(h)
            text = "".join(e.text for e in events)
            reason = events[-1].finish_reason
        else:
            c = h.result()
            text, reason = c.text, c.finish_reason
        assert reason in (FinishReason.EOS, FinishReason.LENGTH), (kind, payload, reason)
        bounded = kind == "json" and payload[2]
        bounded_total += bounded
        if reason == FinishReason.LENGTH:
            cut["bounded" if bounded else "unbounded"] += 1
            continue
        if kind == "json":
            validator(payload[1]).validate(json.loads(text))
        elif kind == "regex":
            assert re.fullmatch(payload, text), (payload, text)
        elif kind == "calls":
            check_calls(text, payload)
        else:  # auto: free text; any call it opened is a valid one
            if "<tool_call>" in text:
                check_calls(text[text.index("<tool_call>"):].split("\n</tool_call>")[0] + "\n</tool_call>", payload)
    for h in free:
        assert h.result().generated_tokens == 24
    assert cut["bounded"] <= 0.05 * bounded_total, cut
    stats = eng.grammars.stats
    assert stats["compiles"] == len({c for _, _, c in cases}) and stats["hits"] == len(cases) - stats["compiles"]


# ---- parity with Hugging Face ----------------------------------------------------------------------


def hf_greedy(hf, ids, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([list(ids)]), do_sample=False, max_new_tokens=n, min_new_tokens=n)
    return out[0, len(ids):].tolist()


def permissive(eng, tokens: list[int]) -> Constraint | None:
    """A regex allowing each of `tokens` in turn and masking most others: up to the text's length of the
    characters it uses, so it is complete (end-of-text forced) right after them. None when the text is not
    plain (an added token, which a regex cannot spell; bytes that are not UTF-8) or uses under 3 characters (a
    forced run: llguidance then allows only the canonical tokenization of the forced text, not any)."""
    if min(tokens) < 9:  # the demo tokenizer's added tokens
        return None
    text = eng.tokenizer.decode(tokens)
    chars = sorted(set(text))
    if "\ufffd" in text or len(chars) < 3:
        return None
    cls = "".join("\\n" if ch == "\n" else ("\\" + ch if ch in "\\]^-[" else ch) for ch in chars)
    return Constraint("regex", f"[{cls}]{{0,{len(text)}}}")


def test_free_rows_beside_constrained_rows_are_hfs_tokens(tiny_ckpt, hf_model):
    rng = random.Random(5)
    prompts = [prompt(rng) for _ in range(4)]
    refs = [hf_greedy(hf_model, p, 16) for p in prompts]
    eng = engine(tiny_ckpt, max_concurrent_seqs=8)
    c = Constraint("json", canonical(SCHEMAS[4][1]))
    handles = []
    for p in prompts:
        handles.append(eng.submit(GenerationRequest(p, SamplingParams(max_new_tokens=16, ignore_eos=True))))
        eng.submit(GenerationRequest(prompt(rng), SamplingParams(max_new_tokens=24), constraint=c))
    assert [list(h.result().token_ids) for h in handles] == refs


def test_a_constraint_allowing_hfs_tokens_keeps_them(tiny_ckpt, hf_model):
    """Fresh, resumed from a prefix-cache snapshot (the first fill sees a CONTINUE chunk) and as a session's
    next turn: the constrained greedy tokens are HF's, and the sequence ends where the text is complete."""
    rng = random.Random(11)
    eng = engine(tiny_ckpt)
    fresh = resumed = 0
    for _ in range(80):
        p = prompt(rng)
        q = p + tuple(rng.randrange(9, 512) for _ in range(7))
        ref = hf_greedy(hf_model, p, 12)
        c = permissive(eng, ref)
        if c is not None and fresh < 2:
            got = eng.submit(GenerationRequest(p, SamplingParams(max_new_tokens=30), constraint=c)).result()
            assert list(got.token_ids) == ref + [eng.tokenizer.eos_token_id], c
            assert got.finish_reason == FinishReason.EOS
            fresh += 1
        ref_q = hf_greedy(hf_model, q, 10)
        cq = permissive(eng, ref_q)
        if cq is not None and resumed < 2:  # a free run snapshots p; q starts from it
            eng.submit(GenerationRequest(p, SamplingParams(max_new_tokens=2, ignore_eos=True))).result()
            got = eng.submit(GenerationRequest(q, SamplingParams(max_new_tokens=10), constraint=cq)).result()
            assert got.cached_tokens > 0 and list(got.token_ids) == ref_q, cq
            resumed += 1
        if fresh >= 2 and resumed >= 2:
            break
    assert fresh >= 2 and resumed >= 2
    # a session: the second turn, constrained, continues from the first's pinned state
    p = prompt(rng)
    first = eng.submit(GenerationRequest(p, SamplingParams(max_new_tokens=5, ignore_eos=True), session_id="s")).result()
    conv = eng.session_conversation("s")
    assert conv == p + first.token_ids
    for _ in range(60):
        turn = conv + tuple(rng.randrange(9, 512) for _ in range(4))
        ref = hf_greedy(hf_model, turn, 8)
        c = permissive(eng, ref)
        if c is not None:
            got = eng.submit(GenerationRequest(turn, SamplingParams(max_new_tokens=8), session_id="s",
                                               constraint=c)).result()
            assert got.cached_tokens >= len(conv) - 1 and list(got.token_ids) == ref
            break
    else:
        pytest.fail("no plain-text continuation found")
    eng.release_session("s")


# ---- bad input, cancel, syncs ------------------------------------------------------------------------


def test_bad_constraints_are_refused_at_submit_and_the_engine_keeps_serving(tiny_ckpt):
    eng = engine(tiny_ckpt, max_concurrent_seqs=2)
    before = eng.stats()["requests_total"]
    bad = [(Constraint("json", '{"type": "foo"}'), 400), (Constraint("json", '{"not": {}}'), 422),
           (Constraint("regex", "(?=x)y"), 422), (Constraint("regex", "x" * 5000), 400)]
    for c, status in bad:
        with pytest.raises(GrammarError) as e:
            eng.submit(GenerationRequest((10, 11), SamplingParams(max_new_tokens=4), constraint=c))
        assert e.value.status == status
    assert eng.stats()["requests_total"] == before  # nothing was queued
    good = eng.submit(GenerationRequest((10, 11), SamplingParams(max_new_tokens=20),
                                        constraint=Constraint("regex", "(yes|no)"))).result()
    assert good.text in ("yes", "no") and good.finish_reason == FinishReason.EOS


def test_an_engine_without_a_grammar_compiler_refuses_with_422():
    eng = fake_engine()
    with pytest.raises(GrammarError) as e:
        eng.submit(GenerationRequest((1, 2), constraint=Constraint("json", "")))
    assert e.value.status == 422 and "unavailable" in e.value.message


class Recorder:
    """Wraps the engine's compiler to keep every row it made."""

    def __init__(self, inner) -> None:
        self.inner, self.rows = inner, []

    def processor(self, constraint):
        row = self.inner.processor(constraint)
        self.rows.append(row)
        return row


def test_cancelled_or_finished_constrained_requests_free_their_matchers(tiny_ckpt):
    eng = engine(tiny_ckpt, max_concurrent_seqs=2)
    eng.grammars = rec = Recorder(eng.grammars)
    long = Constraint("regex", "[a-z]{400}")
    h = eng.submit(GenerationRequest((10, 11, 12), SamplingParams(max_new_tokens=400), constraint=long))
    it = iter(h)
    for _ in range(3):
        next(it)
    h.cancel()
    assert h.result().finish_reason == FinishReason.CANCELLED
    done = eng.submit(GenerationRequest((10, 11), SamplingParams(max_new_tokens=20),
                                        constraint=Constraint("regex", "(yes|no)"))).result()
    assert done.finish_reason == FinishReason.EOS
    assert len(rec.rows) == 2 and all(r.closed for r in rec.rows)
    sampler = eng.runner.sampler
    assert all(p.closed for p in sampler.processors.values())


def test_a_decode_step_with_constrained_rows_reads_the_device_back_once(tiny_ckpt):
    from model.runtime.runner import ModelRunner
    from model.types import EngineConfig, SeqChunk, StepBatch

    eng = engine(tiny_ckpt, max_concurrent_seqs=2)
    rows = [eng.grammars.processor(Constraint("json", canonical(s))) for _, s, _ in SCHEMAS[:2]]
    r = ModelRunner(tiny_ckpt, EngineConfig(max_concurrent_seqs=3, max_input_tokens=32, max_total_tokens=64,
                                            kv_cache_tokens=512), decode_mode="eager")
    slots = [r.allocator.allocate(40) for _ in range(3)]
    for s, row in zip(slots, [*rows, None], strict=True):
        r.open(s, SamplingParams(), None, (3, 4), row)
    first = r.step(StepBatch(tuple(SeqChunk.fresh(s, (3, 4, 5), True) for s in slots)))
    batch = StepBatch(tuple(SeqChunk.decode(s, t, 3) for s, t in zip(slots, first.token_ids, strict=True)))
    with count_syncs() as syncs:
        out = r.step(batch)
    assert syncs.count == 1 and dict(syncs.by_kind) == {"tolist": 1}
    assert eng.tokenizer.decode(first.token_ids[:1] + out.token_ids[:1]).startswith("{")
