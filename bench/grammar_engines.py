"""xgrammar vs llguidance on our tokenizers: the measurement that picked model/grammar's engine (issue 19).

    .venv/bin/python -m bench.grammar_engines [--out bench/results/grammar-engines.json] [--quick]

Two tokenizers: the demo checkpoint's own (byte-level BPE, 4096 tokens, model/text/demo_tokenizer.py) and a
real-vocabulary-size one built offline (big_tokenizer: the same BPE grown by merges to 100352 tokens, the size of
Granite 4.0's vocabulary), both loaded as Hugging Face tokenizers, as the server loads a checkpoint's.
Per engine and tokenizer:
  - tokenizer setup seconds (once per server);
  - compile of a typical 5-tool call schema (bench/grammar_cases.py TOOLS): first and cached;
  - mask time per token: a seeded random walk through that grammar (each step picks an allowed token), masks
    filled one row after another on one thread (what the sampler's per-row hook does), at 1 row and 64 rows,
    and with the engine's own parallel batch fill at 64 rows;
  - correctness: random walks over every case of the suite (25 schemas, 8 regexes, tool calls) checked with
    jsonschema / re.fullmatch; compile errors counted.
Machine noise: alternated runs, best of `repeats`. Results: bench/results/grammar-engines.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.grammar_cases import REGEXES, SCHEMAS, canonical

GRANITE_VOCAB = 100352


def tool_schema() -> dict:
    from bench.grammar_cases import tool_specs
    from model.grammar.source import tool_call_schema
    from model.types import Constraint

    return tool_call_schema(Constraint("tool_calls", tools=tool_specs()))


# ---- tokenizers -------------------------------------------------------------------------------------


def big_tokenizer(ckpt: Path, out: Path, size: int = GRANITE_VOCAB, seed: int = 0) -> Path:
    """A real byte-level BPE tokenizer of `size` tokens, offline: the demo tokenizer's, its vocabulary grown by
    merges of existing tokens into word-like ones (a letter token, with or without its leading space, followed
    by a lowercase one), as a large BPE vocabulary is made of. Written as a Hugging Face tokenizer folder."""
    import shutil

    d = json.loads((ckpt / "tokenizer.json").read_text())
    vocab, merges = d["model"]["vocab"], d["model"]["merges"]
    words = [t for t in vocab if re.fullmatch("\u0120?[A-Za-z]+", t)]
    tails = [t for t in vocab if re.fullmatch("[a-z]+", t)]
    rng = random.Random(seed)
    while len(vocab) < size:
        a, b = rng.choice(words), rng.choice(tails)
        if a + b in vocab or len(a + b) > 16:
            continue
        vocab[a + b] = len(vocab)
        merges.append([a, b])
        words.append(a + b)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(d))
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(ckpt / f, out / f)
    return out


def load_tokenizer(path: Path) -> tuple[list[bytes], int, object]:
    """(token bytes by id, eos id, the HF tokenizer) of a tokenizer folder."""
    from transformers import AutoTokenizer

    from model.text.detok import byte_table

    hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    added = {i: t.content for i, t in hf.added_tokens_decoder.items()}
    return byte_table(hf.convert_ids_to_tokens(list(range(len(hf)))), added), hf.eos_token_id, hf


# ---- the two engines behind one interface ---------------------------------------------------------------


class LLG:
    name = "llguidance"

    def __init__(self, tokens: list[bytes], eos: int, hf) -> None:
        import llguidance
        import llguidance.hf

        t0 = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(hf, n_vocab=len(tokens), eos_token=eos)
        self.setup_s = time.perf_counter() - t0
        self.vocab, self.eos = len(tokens), eos
        self.cache: dict[str, object] = {}
        self.executor = llguidance.LLExecutor()

    def compile(self, kind: str, value: str, cached: bool = True):
        import llguidance

        key = kind + value
        if cached and key in self.cache:
            return self.cache[key].deep_copy()
        from model.grammar.compiler import limits
        from model.grammar.source import JSON_OPTIONS, closed

        g = (llguidance.LLMatcher.grammar_from_json_schema({**closed(json.loads(value)), "x-guidance": JSON_OPTIONS})
             if kind == "json" else llguidance.LLMatcher.grammar_from_regex(value))
        m = llguidance.LLMatcher(self.tok, g, log_level=0, limits=limits())
        if m.is_error():
            raise ValueError(m.get_error())
        m.compute_bitmask()
        self.cache[key] = m
        return m.deep_copy()

    def fill(self, m, bitmask, i: int) -> None:
        row = bitmask[i]
        m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def fill_batch(self, ms, bitmask) -> None:
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(ms)], bitmask.ctypes.data,
                                              bitmask.shape[1] * 4, bitmask.shape[0])

    def accept(self, m, t: int) -> bool:
        return m.consume_token(t)

    def done(self, m) -> bool:
        return m.is_stopped()


class XGR:
    name = "xgrammar"

    def __init__(self, tokens: list[bytes], eos: int, hf) -> None:
        import xgrammar as xgr

        t0 = time.perf_counter()
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=len(tokens), stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=True)
        self.setup_s = time.perf_counter() - t0
        self.vocab, self.eos = len(tokens), eos
        self.batch = xgr.BatchGrammarMatcher(max_threads=2)
        self.xgr = xgr

    def compile(self, kind: str, value: str, cached: bool = True):
        if not cached:
            self.compiler.clear_cache()
        cg = (self.compiler.compile_json_schema(value, any_whitespace=False, separators=(", ", ": "))
              if kind == "json" else self.compiler.compile_regex(value))
        return self.xgr.GrammarMatcher(cg)

    def fill(self, m, bitmask, i: int) -> None:
        m.fill_next_token_bitmask(bitmask, i)

    def fill_batch(self, ms, bitmask) -> None:
        self.batch.batch_fill_next_token_bitmask(ms, bitmask)

    def accept(self, m, t: int) -> bool:
        return m.accept_token(t)

    def done(self, m) -> bool:
        return m.is_terminated()


# ---- measurements -----------------------------------------------------------------------------------------


def allowed_ids(row: np.ndarray, vocab: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(row.view(np.uint8), count=vocab, bitorder="little"))


def walk(eng, kind: str, value: str, rows: int, steps: int, seed: int, batch: bool = False) -> dict:
    """`rows` matchers stepped together for up to `steps` tokens; mask seconds per filled row."""
    import torch

    ms = [eng.compile(kind, value) for _ in range(rows)]
    bitmask = torch.zeros((rows, (eng.vocab + 31) // 32), dtype=torch.int32).numpy()
    rng = np.random.default_rng(seed)
    toks: list[list[int]] = [[] for _ in range(rows)]
    ended: set[int] = set()
    fill_s, filled = 0.0, 0
    for _ in range(steps):
        for i, m in enumerate(ms):  # complete (nothing more may follow): end-of-text, as model/grammar forces it
            if i not in ended and eng.done(m):
                toks[i].append(eng.eos)
                ended.add(i)
        live = [i for i in range(rows) if i not in ended]
        if not live:
            break
        t0 = time.perf_counter()
        if batch:
            eng.fill_batch(ms, bitmask)
        else:
            for i in live:
                eng.fill(ms[i], bitmask, i)
        fill_s += time.perf_counter() - t0
        filled += len(live) if not batch else rows
        for i in live:
            ids = allowed_ids(bitmask[i], eng.vocab)
            t = int(ids[rng.integers(len(ids))])
            toks[i].append(t)
            if t == eng.eos:
                ended.add(i)
                continue
            assert eng.accept(ms[i], t), (eng.name, kind, i)
    return dict(us_per_row=1e6 * fill_s / max(filled, 1), ms_per_step=1e3 * fill_s / max(steps, 1), tokens=toks)


def text_of(tokens: list[bytes], ids: list[int], eos: int) -> tuple[str, bool]:
    done = bool(ids) and ids[-1] == eos
    return b"".join(tokens[t] for t in ids if t != eos).decode("utf-8", "replace"), done


def correctness(eng, tokens: list[bytes], steps: int, seeds: int) -> dict:
    import jsonschema

    out = dict(compile_errors=[], walks=0, finished=0, valid=0, invalid=[])
    cases = [("json", canonical(s), s) for _, s, _ in SCHEMAS] + [("regex", r, r) for r in REGEXES]
    cases.append(("json", canonical(tool_schema()), tool_schema()))
    for kind, value, spec in cases:
        try:
            eng.compile(kind, value, cached=False)
        except Exception as e:  # noqa: BLE001 - an engine's refusal is a result here
            out["compile_errors"].append(f"{value[:60]}: {str(e)[:120]}")
            continue
        for seed in range(seeds):
            ids = walk(eng, kind, value, 1, steps, seed)["tokens"][0]
            text, done = text_of(tokens, ids, eng.eos)
            out["walks"] += 1
            if not done:
                continue
            out["finished"] += 1
            try:
                if kind == "json":
                    cls = jsonschema.validators.validator_for(spec)
                    cls(spec, format_checker=cls.FORMAT_CHECKER).validate(json.loads(text))
                else:
                    assert re.fullmatch(spec, text)
                out["valid"] += 1
            except Exception as e:  # noqa: BLE001
                out["invalid"].append(f"{value[:50]} -> {text[:80]!r}: {str(e)[:80]}")
    out["invalid"] = out["invalid"][:10]
    return out


def measure(eng_cls, tokens, eos, hf, repeats: int, steps: int) -> dict:
    eng = eng_cls(tokens, eos, hf)
    schema = canonical(tool_schema())
    first = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        eng.compile("json", schema, cached=False)
        first.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    eng.compile("json", schema, cached=True)
    cached = time.perf_counter() - t0
    res = dict(tokenizer_setup_s=round(eng.setup_s, 4), compile_5_tools_first_ms=round(1e3 * min(first), 3),
               compile_5_tools_cached_ms=round(1e3 * cached, 4))
    for rows in (1, 64):
        runs = [walk(eng, "json", schema, rows, steps, seed=r) for r in range(repeats)]
        res[f"mask_us_per_token_{rows}_rows"] = round(min(r["us_per_row"] for r in runs), 2)
        res[f"mask_ms_per_step_{rows}_rows"] = round(min(r["ms_per_step"] for r in runs), 3)
    runs = [walk(eng, "json", schema, 64, steps, seed=r, batch=True) for r in range(repeats)]
    res["mask_ms_per_step_64_rows_parallel_fill"] = round(min(r["ms_per_step"] for r in runs), 3)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/grammar-engines.json")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and walks")
    args = ap.parse_args(argv)
    repeats, steps, seeds = (1, 40, 1) if args.quick else (3, 60, 3)
    from model.checkpoint.demo import demo_dir

    tmp = Path(tempfile.gettempdir()) / "granite-bench-ckpt"
    ckpt = demo_dir(tmp, "demo")
    demo_tokens, eos, hf = load_tokenizer(ckpt)
    big, _, big_hf = load_tokenizer(big_tokenizer(ckpt, tmp / "granite-size-tokenizer"))
    report: dict = dict(machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
                        note="2-core VM shared with other work: absolute times are noisy, compare within a run",
                        tokenizers={"demo": len(demo_tokens), "granite-size synthetic": len(big)}, engines={})
    for eng_cls in (LLG, XGR):  # alternated per tokenizer below
        report["engines"][eng_cls.name] = {}
    for tname, (tokens, thf) in {"demo": (demo_tokens, hf), "granite-size synthetic": (big, big_hf)}.items():
        for eng_cls in (LLG, XGR):
            r = measure(eng_cls, tokens, eos, thf, repeats, steps)
            r["correctness"] = correctness(eng_cls(tokens, eos, thf), tokens, 300, seeds)
            report["engines"][eng_cls.name][tname] = r
            print(eng_cls.name, tname, json.dumps({k: v for k, v in r.items() if k != "correctness"}), flush=True)
            c = r["correctness"]
            print("   correctness:", c["valid"], "/", c["finished"], "finished of", c["walks"], "walks;",
                  len(c["compile_errors"]), "compile errors", flush=True)
    report["choice"] = CHOICE
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


CHOICE = {
    "engine": "llguidance",
    "why": [
        "correctness: every finished walk of the suite valid on both tokenizers (96/96), where xgrammar 0.2.9 "
        "produced invalid output on 5-12% of walks: raw control characters inside JSON strings (invalid JSON), "
        "allOf schemas generating a bare string or an array, a date-time on June 31 (the issue asks 100%)",
        "bounded by design: explicit parser limits (lexer fuel per compile and per step, lexer states, grammar "
        "size) turn a pathological regex or schema into an error instead of unbounded time or memory; xgrammar's "
        "compile has no such bound",
        "compile is lazy and independent of the vocabulary (about 2 ms for the 5-tool schema at 100k tokens vs "
        "xgrammar's 38-177 ms), so a new schema costs a request almost nothing",
        "no dependencies (one Rust wheel); xgrammar 0.2.9 requires triton, apache-tvm-ffi, pydantic and "
        "transformers at runtime",
    ],
    "cost": "masks are slower: per token ~10x xgrammar's on the demo tokenizer and 20-60x at the Granite-size "
            "vocabulary (about 0.4-0.8 ms per row, 29 ms per step at 64 rows on one thread of the loaded 2-core "
            "VM; xgrammar ~1 ms). model/grammar fills a step's rows in llguidance's thread pool where the machine "
            "has >= 4 cores, on the host while the device runs the forward; not yet measured on a GPU host "
            "(none was lent to this task)",
}


if __name__ == "__main__":
    main()
