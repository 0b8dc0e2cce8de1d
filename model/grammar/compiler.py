"""Constraint -> GrammarRow (model/types.py GrammarCompiler), with llguidance (bench/grammar_engines.py says why).

Each distinct Constraint is compiled once per tokenizer (one Grammars per engine, so per tokenizer) into a pristine
matcher kept in a bounded LRU cache; every request gets its own copy of it (deep_copy: no recompile). A compile is
bounded three ways: the request's text (source.py size limits), llguidance's parser limits (grammar size, lexer
states and fuel: a pathological regex or schema stops with an error instead of running away in time or memory),
and a wall-clock check (a grammar slower than `max_compile_s` to compile is refused, as too complex to serve).
Errors are GrammarError: 400 for invalid input, 422 for a feature llguidance does not implement or a grammar
over the limits, the message quoting llguidance's own.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from model.grammar.matcher import GrammarRow
from model.grammar.source import CLOSE, OPEN, grammar_text
from model.types import Constraint, GrammarError

# llguidance messages that mean "valid, but not something it can compile" (422) rather than "invalid" (400).
_UNSUPPORTED = ("unimplemented", "not supported", "unsupported", "unknown format", "too complex", "fuel",
                "limit", "too many", "too large")


def classify(message: str, what: str) -> GrammarError:
    low = message.lower()
    if any(k in low for k in _UNSUPPORTED):
        return GrammarError(f"{what} uses a feature the grammar engine cannot compile: {message}", status=422,
                            error_type="unsupported_grammar")
    return GrammarError(f"{what} is invalid: {message}")


def _what(c: Constraint) -> str:
    return {"json": "the JSON schema", "regex": "the regex", "tool_calls": "the tools' parameter schemas"}[c.kind]


def limits():
    """llguidance's parser limits, set here explicitly: every compile and every step's mask is bounded by them.
    Its defaults (lexer fuel ~20 ms to build, ~14 ms per step at most; 250k lexer states), grammar size halved."""
    import llguidance

    return llguidance.LLParserLimits(max_items_in_row=2000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
                                     step_max_items=50_000, max_lexer_states=250_000, max_grammar_size=250_000)


class Grammars:
    """model/types.py GrammarCompiler over one tokenizer. `tokenizer`: an llguidance LLTokenizer (see for_tokenizer)."""

    def __init__(self, tokenizer, eos_token_id: int, vocab_size: int, cache_size: int = 128,
                 max_compile_s: float = 5.0) -> None:
        self.tokenizer = tokenizer
        self.eos = eos_token_id
        self.vocab = vocab_size
        self.cache_size = cache_size
        self.max_compile_s = max_compile_s
        self._cache: OrderedDict[Constraint, object] = OrderedDict()
        self._lock = threading.Lock()
        self.specials = frozenset(t for t in (OPEN, CLOSE) if self._is_special(t))
        self.stats = dict(compiles=0, hits=0, compile_s_total=0.0, last_compile_s=0.0)

    def _is_special(self, text: str) -> bool:
        ids = self.tokenizer.tokenize_str(text, parse_special=True)
        return len(ids) == 1 and self.tokenizer.is_special_token(ids[0])

    def processor(self, constraint: Constraint) -> GrammarRow:
        with self._lock:
            proto = self._cache.get(constraint)
            if proto is not None:
                self._cache.move_to_end(constraint)
                self.stats["hits"] += 1
                return GrammarRow(proto.deep_copy(), self.eos, self.vocab)
        proto = self.compile(constraint)  # outside the lock: other requests' hits go on meanwhile
        with self._lock:
            self._cache[constraint] = proto
            self._cache.move_to_end(constraint)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return GrammarRow(proto.deep_copy(), self.eos, self.vocab)

    def compile(self, constraint: Constraint):
        """A pristine llguidance matcher for `constraint`, its first mask computed (lazy errors surface here)."""
        import llguidance

        what = _what(constraint)
        t0 = time.perf_counter()
        try:
            text = grammar_text(constraint, self.specials)
        except ValueError as e:  # llguidance's own parse of the schema text
            raise GrammarError(f"{what} is invalid: {e}") from None
        m = llguidance.LLMatcher(self.tokenizer, text, log_level=0, limits=limits())
        if not m.is_error():
            m.compute_bitmask()
        seconds = time.perf_counter() - t0
        with self._lock:
            self.stats["compiles"] += 1
            self.stats["compile_s_total"] += seconds
            self.stats["last_compile_s"] = seconds
        if m.is_error():
            raise classify(m.get_error(), what)
        if seconds > self.max_compile_s:
            raise GrammarError(f"{what} is too complex: compiling it took {seconds:.1f} s (limit "
                               f"{self.max_compile_s:.1f} s)", status=422, error_type="unsupported_grammar")
        return m


def for_tokenizer(tokenizer, vocab_size: int, **kw) -> Grammars:
    """Grammars over a model/text/tokenizer.py Tokenizer (its Hugging Face tokenizer, added tokens included);
    vocab_size: the model's (the mask's width; ids the tokenizer lacks are never allowed)."""
    import llguidance.hf

    eos = tokenizer.eos_token_id
    lltok = llguidance.hf.from_tokenizer(tokenizer.hf, n_vocab=vocab_size, eos_token=eos)
    return Grammars(lltok, eos, vocab_size, **kw)
