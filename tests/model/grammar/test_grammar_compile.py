"""model/grammar without a model: the grammar text of each constraint kind, bad input as GrammarError with its
status (400 invalid, 422 unsupported / too complex) and the engine's message, bounded compile of pathological
input, the compile cache, and one row's matcher on the sampler hook (no advance on prompt chunks, end-of-text
only where the grammar accepts, forced once it is complete, close frees it)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from bench.grammar_cases import REGEXES, SCHEMAS, TOOLS, canonical, tool_specs
from model.grammar import source
from model.grammar.compiler import for_tokenizer
from model.text.tokenizer import Tokenizer
from model.types import Constraint, GrammarError, RequestError, SeqChunk, ToolSpec


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return Tokenizer.from_dir(tiny_ckpt)


@pytest.fixture(scope="module")
def grammars(tok):
    return for_tokenizer(tok, 512)


def walk(row, tok, forced_text: str | None = None, steps: int = 200, seed: int = 0) -> list[int]:
    """Drive a row as the sampler would: fill, pick an allowed token (the forced text's next token where given,
    else a seeded random allowed one), feed it back as the next DECODE chunk. Returns the tokens."""
    gen = torch.Generator().manual_seed(seed)
    forced = tok.encode(forced_text) if forced_text is not None else None
    allowed = torch.ones(row.vocab, dtype=torch.bool)
    row.fill(allowed, SeqChunk.fresh(0, (11, 12, 13), True))
    out: list[int] = []
    for i in range(steps):
        if forced is not None and i < len(forced):
            t = forced[i]
            assert allowed[t], f"token {i} of {forced_text!r} masked"
        else:
            ids = allowed.nonzero().flatten()
            t = int(ids[torch.randint(len(ids), (1,), generator=gen)])
        out.append(t)
        if t == tok.eos_token_id:
            break
        allowed.fill_(True)
        row.fill(allowed, SeqChunk.decode(0, t, 3 + i))
    return out


def test_every_case_of_the_suite_compiles(grammars):
    for name, schema, _ in SCHEMAS:
        assert grammars.processor(Constraint("json", canonical(schema))) is not None, name
    for rx in REGEXES:
        grammars.processor(Constraint("regex", rx))
    grammars.processor(Constraint("tool_calls", tools=tool_specs()))


@pytest.mark.parametrize("constraint, status, words", [
    (Constraint("json", '{"type": "foo"}'), 400, ["Invalid type", "foo"]),
    (Constraint("json", "{not json"), 400, ["not valid JSON"]),
    (Constraint("json", "false"), 400, ["nothing matches"]),
    (Constraint("json", "[1, 2]"), 400, ["must be a JSON object"]),
    (Constraint("json", '{"minItems": "x"}'), 400, ["minItems"]),
    (Constraint("json", '{"$ref": "#/$defs/missing"}'), 400, ["missing"]),
    (Constraint("json", '{"type": "string", "pattern": "(("}'), 400, ["unclosed group"]),
    (Constraint("json", '{"type": "object", "properties": {"a": {"not": {"type": "string"}}}}'), 422,
     ["Unimplemented keys", "not"]),
    (Constraint("json", '{"type": "array", "uniqueItems": true}'), 422, ["uniqueItems"]),
    (Constraint("json", '{"type": "string", "format": "weird-fmt"}'), 422, ["weird-fmt"]),
    (Constraint("json", json.dumps({"type": "object", "description": "x" * 70000})), 400, ["at most"]),
    (Constraint("regex", "(?=a)b"), 422, ["look-around"]),
    (Constraint("regex", r"(a|b)*c\1"), 422, ["backreferences"]),
    (Constraint("regex", "a{2,1}"), 400, ["repetition"]),
    (Constraint("regex", "a" * 3000), 400, ["at most"]),
    (Constraint("tool_calls", tools=(ToolSpec("f", '{"type": "bogus"}'),)), 400, ["Invalid type"]),
])
def test_bad_input_is_a_grammar_error_with_status_and_message(grammars, constraint, status, words):
    with pytest.raises(GrammarError) as e:
        grammars.processor(constraint)
    assert isinstance(e.value, RequestError) and e.value.status == status, e.value.message
    assert e.value.error_type == ("unsupported_grammar" if status == 422 else "invalid_grammar")
    for w in words:
        assert w in e.value.message
    assert constraint not in grammars._cache  # a refused constraint is not cached


@pytest.mark.timeout(120)
@pytest.mark.parametrize("rx", [r"(.{0,1000}){0,1000}x{1,10000}", r"((a|b|ab)*)*c{1,100}(a{1,100}){1,100}",
                                r"([a-z]{1,500}[0-9]{1,500}){1,500}"])
def test_pathological_regex_is_bounded(grammars, tok, rx):
    """Nested counted repetitions either fail to compile (parser limits: GrammarError) or serve a bounded walk:
    every step's mask is computed (the per-step lexer fuel), and a step over the limits ends the row with
    end-of-text instead of failing."""
    try:
        row = grammars.processor(Constraint("regex", rx))
    except GrammarError as e:
        assert e.status in (400, 422)
        return
    out = walk(row, tok, steps=80)
    assert len(out) <= 80 and (row.error is None or out[-1] == tok.eos_token_id)


def test_compiled_once_per_distinct_constraint_lru_bounded(tok):
    g = for_tokenizer(tok, 512, cache_size=2)
    a, b, c = (Constraint("regex", rx) for rx in REGEXES[:3])
    g.processor(a)
    g.processor(a)
    assert g.stats["compiles"] == 1 and g.stats["hits"] == 1
    g.processor(b)
    g.processor(c)  # evicts a
    assert list(g._cache) == [b, c]
    g.processor(a)
    assert g.stats["compiles"] == 4


def test_each_request_gets_its_own_matcher(grammars, tok):
    c = Constraint("regex", "(yes|no)")
    r1, r2 = grammars.processor(c), grammars.processor(c)
    assert tok.decode(walk(r1, tok, "yes")[:-1]) == "yes"
    assert tok.decode(walk(r2, tok, "no")[:-1]) == "no"


def test_prompt_chunks_never_advance_and_end_of_text_is_forced_once_complete(grammars, tok):
    word = next(w for w in ("the", "is", "was", "a") if len(tok.encode(w)) == 1)
    row = grammars.processor(Constraint("regex", f"({word}|zzz)"))
    allowed = torch.ones(row.vocab, dtype=torch.bool)
    y = tok.encode(word)
    row.fill(allowed, SeqChunk.cont(0, (y[0],), 40, True))  # a resumed prompt's last chunk: not fed
    assert row.tokens == 0
    eos = tok.eos_token_id
    assert not allowed[eos] and allowed[y[0]]  # nothing matched yet: no end
    allowed.fill_(True)
    row.fill(allowed, SeqChunk.decode(0, y[0], 41))
    assert row.tokens == 1 and allowed.nonzero().flatten().tolist() == [eos]
    row.close()
    allowed.fill_(True)
    row.fill(allowed, SeqChunk.decode(0, eos, 42))
    assert row.closed and bool(allowed.all())


def test_ids_beyond_the_tokenizer_are_never_allowed(tok):
    g = for_tokenizer(tok, 600)  # the model's vocab can be wider than the tokenizer's
    row = g.processor(Constraint("json", ""))
    allowed = torch.ones(600, dtype=torch.bool)
    row.fill(allowed, SeqChunk.fresh(0, (1,), True))
    assert not allowed[512:].any() and allowed[:512].any()


def test_json_output_has_no_free_whitespace(grammars, tok):
    """The only spaces in a walk are the separators' and those inside strings: none around brackets."""
    for seed in range(5):
        row = grammars.processor(Constraint("json", canonical(SCHEMAS[0][1])))
        text = tok.decode(walk(row, tok, seed=seed), skip_special_tokens=True)
        obj = json.loads(text)
        assert text == json.dumps(obj, ensure_ascii=False) or text == json.dumps(obj)


def test_tool_call_grammar_is_the_chat_templates_markup(grammars, tok):
    c = Constraint("tool_calls", tools=tool_specs(), parallel=False)
    assert grammars.specials == {"<tool_call>", "</tool_call>"}  # the demo tokenizer's own added tokens
    text = source.grammar_text(c, grammars.specials)
    assert "start: call\n" in text and "<tool_call>" in text and '"<tool_call>"' not in text
    assert '"<tool_call>"' in source.grammar_text(c, frozenset())  # a tokenizer without them: plain text
    call = '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}\n</tool_call>'
    out = walk(grammars.processor(c), tok, call)
    assert out[-1] == tok.eos_token_id and tok.decode(out[:-1]) == call


def test_parallel_calls_and_auto_mode(grammars, tok):
    one = '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}\n</tool_call>'
    two = one + "\n" + one.replace("UTC", "CET")
    out = walk(grammars.processor(Constraint("tool_calls", tools=tool_specs())), tok, two)
    assert tok.decode(out[:-1]) == two and out[-1] == tok.eos_token_id
    auto = grammars.processor(Constraint("tool_calls", tools=tool_specs(), tool_mode="auto"))
    allowed = torch.ones(auto.vocab, dtype=torch.bool)
    auto.fill(allowed, SeqChunk.fresh(0, (1,), True))
    free = int(allowed.sum())
    assert free > 400 and allowed[tok.eos_token_id]  # free text, may end at once
    text = "Let me check. " + one
    out = walk(auto, tok, text)
    assert tok.decode(out[:len(tok.encode(text))]) == text


def test_a_wrong_tool_name_or_argument_is_masked(grammars, tok):
    c = Constraint("tool_calls", tools=tool_specs(TOOLS[:1]))
    with pytest.raises(AssertionError, match="masked"):
        walk(grammars.processor(c), tok, '<tool_call>\n{"name": "get_time"')
    with pytest.raises(AssertionError, match="masked"):
        walk(grammars.processor(c), tok, '<tool_call>\n{"name": "get_weather", "arguments": {"unit": "kelvin"')


def test_regex_walks_are_full_matches(grammars, tok):
    for rx in REGEXES:
        for seed in range(3):
            out = walk(grammars.processor(Constraint("regex", rx)), tok, seed=seed)
            assert out[-1] == tok.eos_token_id
            assert re.fullmatch(rx, tok.decode(out[:-1])), (rx, tok.decode(out))


@pytest.mark.parametrize("pool", [False, True])
def test_fill_rows_equals_one_row_after_another(grammars, tok, monkeypatch, pool):
    """The batched fill (llguidance's thread pool where the machine has cores; forced on here, or off) gives
    every row the mask its own fill gives, across steps, rows ending (end-of-text only) and rows closed."""
    import llguidance

    from model.grammar import matcher
    from model.grammar.matcher import GrammarRow

    monkeypatch.setattr(matcher, "_EXECUTOR", [llguidance.LLExecutor() if pool else None])
    cs = [Constraint("json", canonical(s)) for _, s, _ in SCHEMAS[:5]] + [Constraint("regex", "(yes|no)")]
    batch = [grammars.processor(c) for c in cs]
    single = [grammars.processor(c) for c in cs]
    gen = torch.Generator().manual_seed(1)
    chunks = [SeqChunk.fresh(i, (11, 12), True) for i in range(len(cs))]
    for step in range(25):
        a = np.ones((len(cs) + 2, 512), dtype=np.bool_)  # (the sampler's numpy view) two free rows around them
        b = torch.ones(a.shape, dtype=torch.bool)
        idx = list(range(1, len(cs) + 1))
        GrammarRow.fill_rows(batch, a, idx, chunks)
        for r, j, c in zip(single, idx, chunks, strict=True):
            r.fill(b[j], c)
        assert np.array_equal(a, b.numpy()) and a[0].all() and a[-1].all()
        nxt = []
        for i, j in enumerate(idx):
            ids = torch.from_numpy(np.flatnonzero(a[j]))
            nxt.append(SeqChunk.decode(i, int(ids[torch.randint(len(ids), (1,), generator=gen)]), 2 + step))
        chunks = nxt
        if step == 10:
            batch[0].close()
            single[0].close()
