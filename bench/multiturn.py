"""Multi-turn conversations with prefix reuse on vs off, in the same run (the engine in-process).

    python bench/multiturn.py [--conversations 8] [--turns 8] [--new-tokens 500] [--gen-tokens 64]

Each conversation sends, per turn, its whole history (every earlier prompt and answer) plus ~500 new
prompt tokens and generates 64 (greedy, EOS ignored); the conversations run concurrently and turn by turn
(all of turn k is submitted together). Reported per turn: mean time to first token, prefill tokens the
engine computed, prompt tokens resumed from snapshots; over the run: aggregate generated tokens/s; and
whether every answer is identical with and without reuse. Token ids are sent directly (the chat template's
re-rendering of an answer is the serve side's concern; matching is on ids either way).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.engine.engine import Engine  # noqa: E402
from model.types import EngineConfig, GenerationRequest, SamplingParams  # noqa: E402


def _turn_ids(conv: int, turn: int, n: int, vocab: int) -> list[int]:
    rng = random.Random(1000 * conv + turn)
    return [rng.randrange(3, vocab) for _ in range(n + rng.randint(-20, 20))]


def _one(engine: Engine, ids: list[int], gen: int, out: dict, key) -> None:
    t0 = time.perf_counter()
    h = engine.submit(GenerationRequest(tuple(ids), SamplingParams(max_new_tokens=gen, ignore_eos=True)))
    ttft, toks = None, []
    for ev in h:
        if ttft is None:
            ttft = time.perf_counter() - t0
        if ev.token_id >= 0:
            toks.append(ev.token_id)
        if ev.error:
            raise RuntimeError(ev.error)
    out[key] = (ttft, toks, h.cached_tokens)


def run_mode(ckpt: Path, reuse: bool, conversations: int, turns: int, new_tokens: int, gen: int,
             **cfg) -> dict:
    base = dict(device="cpu", dtype="float32", max_concurrent_seqs=conversations, max_input_tokens=8192,
                max_total_tokens=16384, prefix_cache=reuse)
    base.update(cfg)
    engine = Engine(ckpt, EngineConfig(**base), "bench")
    engine.start()
    if not engine.wait_ready(300):
        raise RuntimeError(engine.error)
    vocab = engine.runner.vocab_size
    try:
        _one(engine, _turn_ids(99, 0, 64, vocab), 4, {}, 0)  # warm-up (its snapshot matches nothing later)
        hist: list[list[int]] = [[] for _ in range(conversations)]
        per_turn, outputs = [], []
        t_start, generated = time.perf_counter(), 0
        for turn in range(turns):
            prompts = [hist[c] + _turn_ids(c, turn, new_tokens, vocab) for c in range(conversations)]
            before = engine.stats()["prefill_tokens_total"]
            res: dict = {}
            threads = [threading.Thread(target=_one, args=(engine, prompts[c], gen, res, c))
                       for c in range(conversations)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if len(res) != conversations:
                raise RuntimeError(f"turn {turn + 1}: {conversations - len(res)} requests failed")
            ttfts = [res[c][0] for c in range(conversations)]
            per_turn.append({"turn": turn + 1,
                             "prompt_tokens": sum(len(p) for p in prompts),
                             "prefill_tokens_computed": engine.stats()["prefill_tokens_total"] - before,
                             "cached_tokens": sum(res[c][2] for c in range(conversations)),
                             "ttft_mean_s": round(sum(ttfts) / len(ttfts), 4), "ttft_max_s": round(max(ttfts), 4)})
            for c in range(conversations):
                hist[c] = prompts[c] + res[c][1]
                generated += len(res[c][1])
            outputs.append([res[c][1] for c in range(conversations)])
        wall = time.perf_counter() - t_start
        stats = engine.stats()
    finally:
        engine.shutdown(5)
    return {"per_turn": per_turn, "wall_s": round(wall, 2), "generated_tokens": generated,
            "tokens_per_s": round(generated / wall, 1),
            "prefill_tokens_computed": sum(t["prefill_tokens_computed"] for t in per_turn),
            "prefix_cache": stats.get("prefix_cache"), "_outputs": outputs}


def run_multiturn(ckpt: Path, conversations: int = 8, turns: int = 8, new_tokens: int = 500, gen: int = 64,
                  **cfg) -> dict:
    """Reuse off, then on, on the same checkpoint; ratios at the last turn and over the run."""
    off = run_mode(ckpt, False, conversations, turns, new_tokens, gen, **cfg)
    on = run_mode(ckpt, True, conversations, turns, new_tokens, gen, **cfg)
    same = off.pop("_outputs") == on.pop("_outputs")
    last_off, last_on = off["per_turn"][-1], on["per_turn"][-1]
    return {
        "conversations": conversations, "turns": turns, "new_prompt_tokens_per_turn": new_tokens,
        "generated_per_turn": gen, "reuse_off": off, "reuse_on": on, "outputs_identical": same,
        f"turn{turns}_ttft_ratio_on_over_off": round(last_on["ttft_mean_s"] / max(last_off["ttft_mean_s"], 1e-9), 3),
        f"turn{turns}_prefill_reduction": round(
            1 - last_on["prefill_tokens_computed"] / max(last_off["prefill_tokens_computed"], 1), 3),
        "run_prefill_reduction": round(1 - on["prefill_tokens_computed"] / max(off["prefill_tokens_computed"], 1), 3),
        "tokens_per_s_ratio_on_over_off": round(on["tokens_per_s"] / max(off["tokens_per_s"], 1e-9), 2),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=500)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--model-dir", help="a checkpoint (default: the demo preset, built in a temp dir)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "multiturn-cpu.json"))
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if a.model_dir:
            ckpt = Path(a.model_dir)
        else:
            from model.checkpoint.demo import build_checkpoint

            ckpt = build_checkpoint(Path(tmp) / "demo", preset="demo")
        report = run_multiturn(ckpt, a.conversations, a.turns, a.new_tokens, a.gen_tokens)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    for mode in ("reuse_off", "reuse_on"):
        print(mode, " ".join(f"t{t['turn']}:{t['ttft_mean_s']:.3f}s/{t['prefill_tokens_computed']}"
                             for t in report[mode]["per_turn"]), f"{report[mode]['tokens_per_s']} tok/s")
    print({k: v for k, v in report.items() if not isinstance(v, dict)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
