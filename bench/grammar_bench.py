"""Constrained decoding's cost (issue 19), the `grammar` section of `make bench` (bench/run.py):

  throughput   aggregate generated tokens/s through the Engine at 32 streams (32 clients, each submitting its next
               request as the last one finishes) with every request constrained to a forced call of the 5 tools
               (bench/grammar_cases.py TOOLS) vs unconstrained requests of the same mean length, rounds alternated
               in one run; target constrained >= 0.9x free
  mask_host    host ms per step spent filling the masks (Sampler.fill: advance + mask of every row) at 64
               constrained rows, random logits, on the demo tokenizer (4096) and a Granite-size one (100352,
               bench/grammar_engines.py big_tokenizer); and the ops the step's mask apply runs (target 1)
  compile      the 5-tool grammar's compile time, first and cached, on both tokenizers

    .venv/bin/python -m bench.grammar_bench [--seconds 20] [--rounds 2]   (writes bench/results/grammar-cpu.json)
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.grammar_cases import tool_specs

STREAMS = 32
RESULTS = Path(__file__).resolve().parent / "results"


def tools_constraint():
    from model.types import Constraint

    return Constraint("tool_calls", tools=tool_specs(), parallel=False)


def prompt_ids(rng: random.Random) -> tuple[int, ...]:
    return tuple(rng.randrange(9, 4000) for _ in range(rng.randint(16, 48)))


def stream_round(eng, constrained: bool, seconds: float, max_new: int | list[int], seed: int) -> dict:
    """32 clients for `seconds`: generated tokens of the requests finished / the time to the last one's end.
    Free requests are given their lengths (a list: each request draws one, end-of-text ignored) so that both kinds
    have the same prompt / output mix."""
    from model.types import GenerationRequest, SamplingParams

    c = tools_constraint() if constrained else None
    lock, tokens, lengths = threading.Lock(), [0], []  # (lengths: of the finished requests)
    t0 = time.perf_counter()
    end = [t0]

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.perf_counter() - t0 < seconds:
            n = rng.choice(max_new) if isinstance(max_new, list) else max_new
            p = SamplingParams(max_new_tokens=n, do_sample=True, seed=rng.randrange(1 << 30),
                               ignore_eos=isinstance(max_new, list))
            out = eng.submit(GenerationRequest(prompt_ids(rng), p, constraint=c)).result()
            with lock:
                tokens[0] += out.generated_tokens
                lengths.append(out.generated_tokens)
                end[0] = time.perf_counter()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return dict(tok_s=tokens[0] / (end[0] - t0), requests=len(lengths), mean_tokens=statistics.mean(lengths),
                lengths=lengths)


def throughput(ckpt: Path, seconds: float, rounds: int) -> dict:
    from model.engine.engine import Engine
    from model.types import EngineConfig

    cfg = EngineConfig(device="cpu", dtype="float32", max_concurrent_seqs=STREAMS, max_input_tokens=64,
                       max_total_tokens=512, kv_cache_tokens=STREAMS * 512, max_step_tokens=512,
                       prefill_chunk_tokens=64, max_queued_requests=256)
    eng = Engine(ckpt, cfg, "demo")
    eng.start()
    assert eng.wait_ready(300), eng.error
    try:
        warm = stream_round(eng, True, min(8.0, seconds), 400, seed=0)  # also: the constrained outputs' lengths
        max_new = warm.pop("lengths")
        out: dict = {"free": [], "constrained": [], "free_lengths_from": f"{len(max_new)} constrained outputs"}
        for r in range(rounds):
            for kind, n in (("free", max_new), ("constrained", 400)):
                res = stream_round(eng, kind == "constrained", seconds, n, seed=2 * r + (kind == "free"))
                res.pop("lengths")
                out[kind].append(res)
        free = statistics.mean(x["tok_s"] for x in out["free"])
        con = statistics.mean(x["tok_s"] for x in out["constrained"])
        out.update(free_tok_s=round(free, 2), constrained_tok_s=round(con, 2), ratio=round(con / free, 3),
                   target_ratio=0.9, compile_stats=dict(eng.grammars.stats))
        return out
    finally:
        eng.shutdown(10)


def mask_host(tok, vocab: int, rows: int = 64, steps: int = 60) -> dict:
    """Host ms per step of Sampler.fill with `rows` forced 5-tool calls (rows that end start a new call)."""
    import torch

    from bench.launches import LaunchCounter
    from model.grammar.compiler import for_tokenizer
    from model.runtime.sampling import Sampler
    from model.types import SamplingParams, SeqChunk

    g = for_tokenizer(tok, vocab)
    c = tools_constraint()
    t0 = time.perf_counter()
    g.processor(c)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    g.processor(c)
    cached = time.perf_counter() - t0
    s = Sampler(rows, vocab, "cpu")
    params = SamplingParams(do_sample=True, seed=1)
    for i in range(rows):
        s.open(i, params, i, (), g.processor(c))
    chunks = [SeqChunk.fresh(i, (10, 11), True) for i in range(rows)]
    gen = torch.Generator().manual_seed(0)
    times, ends = [], 0
    for step in range(steps):
        t0 = time.perf_counter()
        mask = s.fill(chunks)
        times.append(time.perf_counter() - t0)
        if step == 1:
            x = torch.zeros(rows, vocab)
            with LaunchCounter() as ops:
                mask.apply(x)
        toks = s.sample(torch.randn(rows, vocab, generator=gen) * 3, list(range(rows)), mask)[:, 0].long().tolist()
        nxt = []
        for i, t in enumerate(toks):
            if t == tok.eos_token_id:  # a finished call: the slot's next request
                ends += 1
                s.open(i, params, i, (), g.processor(c))
                nxt.append(SeqChunk.fresh(i, (10, 11), True))
            else:
                nxt.append(SeqChunk.decode(i, t, 2 + step))
        chunks = nxt
    return dict(rows=rows, vocab=vocab, mask_ms_per_step_mean=round(1e3 * statistics.mean(times[2:]), 3),
                mask_ms_per_step_p50=round(1e3 * statistics.median(times[2:]), 3),
                calls_completed=ends, apply_ops_per_step=ops.summary()["launches"],
                compile_5_tools_first_ms=round(1e3 * first, 3), compile_5_tools_cached_ms=round(1e3 * cached, 4))


def report(ckpt: Path, seconds: float = 20.0, rounds: int = 2) -> dict:
    from bench.grammar_engines import big_tokenizer
    from model.text.tokenizer import Tokenizer

    out: dict = {"model": "demo preset (random weights), fp32, CPU", "streams": STREAMS}
    tok = Tokenizer.from_dir(ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        big = Tokenizer.from_dir(big_tokenizer(ckpt, Path(tmp) / "big"))
        out["mask_host"] = {"demo": mask_host(tok, 4096), "granite-size": mask_host(big, big.vocab_size)}
    out["mask_host"]["target_apply_ops_per_step"] = 1
    out["compile"] = {k: {f: v[f] for f in ("compile_5_tools_first_ms", "compile_5_tools_cached_ms")}
                      for k, v in out["mask_host"].items() if isinstance(v, dict)}
    out["throughput"] = throughput(ckpt, seconds, rounds)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "grammar-cpu.json"))
    a = ap.parse_args(argv)
    from model.checkpoint.demo import demo_dir

    ckpt = demo_dir(Path(tempfile.gettempdir()) / "granite-bench-ckpt", "demo")
    r = report(ckpt, a.seconds, a.rounds)
    r.update(machine=f"{platform.node()} {platform.machine()}", seconds_per_round=a.seconds, rounds=a.rounds)
    Path(a.out).write_text(json.dumps(r, indent=2) + "\n")
    print(json.dumps({k: v for k, v in r.items() if k != "throughput"}, indent=1))
    t = r["throughput"]
    print(f"32 streams: free {t['free_tok_s']} tok/s, constrained {t['constrained_tok_s']} tok/s, "
          f"ratio {t['ratio']} (target >= 0.9)")
    return r


if __name__ == "__main__":
    main()
