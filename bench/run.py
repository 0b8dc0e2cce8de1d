"""`make bench`: the engine against serial Hugging Face `generate`, measured in the same run.

Sections of the JSON report (bench/results/<machine>-<date>.json and latest-cpu.json):
  parity      greedy tokens of the engine vs HF generate on the same fp32 weights
  throughput  aggregate generated tokens/s through the HTTP server at 1, 8, 32 concurrent streams,
              vs serial HF generate of the same prompts; TTFT / TPOT p50 and p99 from the streams
  memory      engine state bytes per live sequence (from the allocated tensors) vs the GRANITE.md formula,
              for the demo model and for the full-size micro architecture (arithmetic only)
  capacity    sequences per GPU for g5 / g6e / p4d / p5 at 8K, 32K, 128K with the largest prefill step's
              temporaries kept back (bench/capacity.py; arithmetic only)
  prefill_memory  peak bytes and time of one prefill chunk (512 tokens) at 512 / 4K / 16K context on CPU, the
              micro's attention heads (bench/prefill_memory.py; linear in the context, no L x Tk term)
  batch       batch entrypoint over 256 records vs the same records one at a time (bench/batch_bench.py)
  multiturn   8 conversations x 8 turns, prefix reuse on vs off: TTFT per turn, prefill tokens computed,
              tokens/s, identical outputs (bench/multiturn.py)
  shared_prompt  32 chat users sharing a ~2K-token system prompt + tools, distinct ~100-token questions, through
              the server, reuse of the snapshot at the system part's end off vs on, alternated: TTFT p50 ratio,
              prefill tokens computed (bench/shared_prompt.py)
  forks       n = 8 forked rows of one prompt vs 8 separate requests of it, alternated: prefill tokens computed,
              aggregate tokens/s, TTFT, identical outputs (bench/forks.py)
  mid         the mid checkpoint (hidden 1024, 12 layers) through HTTP: 1, 8, 32 streams; at 32 the prefill
              time bound off vs on (bench/mid.py; ~5 min)
  host_work   host ms per runner step with the network's compute stubbed out (decode 1 x 2K, 64 x 2K,
              64 x 16K; packed prefill of 16 uneven prompts), before / after / target; the engine's own time
              per step outside the runner at 1 and 64 streams (bench/host_time.py)
  compile     every Triton kernel the CUDA path launches, compiled on CPU for sm_80 / 86 / 89 / 90 through our call
              sites at the full-size micro's shapes: shared memory, registers, spills per kernel per architecture,
              over-limit configs, variants compiled after warmup (bench/compile_report.py; with triton 3.6.0 too
              when COMPILE_TRITON36=1)
  grammar     constrained decoding (issue 19): tokens/s at 32 streams, every request a forced call of 5 tools vs
              free, alternated (target >= 0.9x); host ms per step on masks at 64 rows (demo and Granite-size
              vocabulary); mask apply ops per step (target 1); 5-tool compile first / cached (bench/grammar_bench.py)
  lora        32 streams with 4 LoRA adapters (rank 16, every target) vs base only, alternated; registration time;
              bytes per adapter and device stacks vs their formulas (bench/lora_bench.py)
  decode_device_work  kernel launches per decode step of the full-size micro pattern (before / after, target
              <= 450) and decode-attention KV bytes per step vs ideal at 64 x 16K (target <= 1.25x),
              counted on CPU (bench/launches.py; ~10 s)

Speed depends on the machine: only ratios measured in one run mean anything.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import tempfile
import time
from pathlib import Path

from bench.http_load import Server, machine_name, prompts, run_concurrency, stream_one

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


# ---- baseline: Hugging Face generate, one request at a time ------------------------------------------

def hf_model(ckpt: Path):
    import torch
    from transformers import GraniteMoeHybridForCausalLM

    m = GraniteMoeHybridForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    return m.eval()


def hf_generate(model, ids: list[int], max_new: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False)
    return out[0, len(ids):].tolist()


def baseline_tok_s(model, prompt_ids: list[list[int]], max_new: int) -> tuple[float, int]:
    t0, n = time.perf_counter(), 0
    for ids in prompt_ids:
        n += len(hf_generate(model, ids, max_new))
    return n / (time.perf_counter() - t0), n


# ---- parity ------------------------------------------------------------------------------------------

def parity(ckpt: Path, texts: list[str], max_new: int) -> dict:
    from model.engine.engine.engine import Engine

    from model.types import EngineConfig, GenerationRequest, SamplingParams

    eng = Engine(ckpt, EngineConfig(max_concurrent_seqs=len(texts), dtype="float32"), "parity")
    eng.start()
    if not eng.wait_ready(300):
        raise RuntimeError(f"engine did not load: {eng.error}")
    try:
        ids = [eng.tokenizer.encode(t) for t in texts]
        handles = [eng.submit(GenerationRequest(tuple(i), SamplingParams(max_new_tokens=max_new))) for i in ids]
        ours = [list(h.result().token_ids) for h in handles]  # all submitted first: they share batches
    finally:
        eng.shutdown()
    ref_model = hf_model(ckpt)
    theirs = [hf_generate(ref_model, i, max_new) for i in ids]
    # HF keeps the EOS token it stopped on; the engine reports it as a finish reason, with the token.
    matches = [a == b for a, b in zip(ours, theirs, strict=True)]
    return {"greedy_match": all(matches), "cases": len(matches), "matching_cases": sum(matches),
            "max_new_tokens": max_new}


# ---- memory -------------------------------------------------------------------------------------------

def memory(ckpt: Path, tokens: int) -> dict:
    import torch

    from model.network.arch import GraniteArch
    from model.runtime.runner import ModelRunner
    from model.runtime.state import bytes_per_seq
    from model.types import EngineConfig

    runner = ModelRunner(ckpt, EngineConfig(max_concurrent_seqs=8, dtype="float32", max_total_tokens=tokens + 1,
                                            max_input_tokens=tokens))
    p = runner.pool
    per_slot = (p.conv.nbytes + p.ssm.nbytes) / p.conv.shape[1]  # measured from the allocated tensors
    per_token = (p.k.nbytes + p.v.nbytes) / (p.k.shape[1] * p.k.shape[2])
    demo = {"tokens": tokens, "state_bytes_per_seq": int(per_slot + tokens * per_token),
            "formula_bytes_per_seq": bytes_per_seq(runner.arch, tokens, p.dtype, p.ssm_dtype)}
    from transformers import GraniteMoeHybridConfig

    full = GraniteArch.from_hf_config(
        GraniteMoeHybridConfig(**json.loads((ROOT / "bench" / "micro_config.json").read_text())))
    micro = {f"{n}": bytes_per_seq(full, n, torch.bfloat16, torch.bfloat16) for n in (4096, 32768, 131072)}
    return {**demo, "full_size_bf16_bytes_per_seq": micro}


# ---- main ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--baseline-requests", type=int, default=6)
    ap.add_argument("--skip-batch", action="store_true")
    ap.add_argument("--skip-multiturn", action="store_true")
    ap.add_argument("--skip-shared-prompt", action="store_true")
    ap.add_argument("--skip-mid", action="store_true")
    ap.add_argument("--skip-grammar", action="store_true")
    ap.add_argument("--skip-forks", action="store_true")
    ap.add_argument("--skip-lora", action="store_true")
    a = ap.parse_args(argv)
    import torch

    from model.checkpoint.demo import build_checkpoint
    from model.text.tokenizer import Tokenizer

    levels = [int(c) for c in a.concurrency.split(",")]
    report: dict = {"machine": machine_name(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "model": "demo preset (random weights), fp32, CPU", "max_new_tokens": a.max_new_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(Path(tmp) / "demo", preset="demo")
        tok = Tokenizer.from_dir(ckpt)
        texts = prompts(max(levels) * 2)
        print("parity ...", flush=True)
        report["parity"] = parity(ckpt, texts[:8], 32)
        print("memory ...", flush=True)
        report["memory"] = memory(ckpt, 4096)
        from bench import capacity, prefill_memory

        report["capacity"] = capacity.report()
        print("prefill chunk memory at growing context ...", flush=True)
        report["prefill_memory"] = prefill_memory.report(Path(tmp) / "wide")
        print("decode launches / KV bytes ...", flush=True)
        from bench import launches

        report["decode_device_work"] = launches.report()
        print("Triton kernels compiled for sm_80 / sm_86 / sm_89 / sm_90 (minutes when TRITON_CACHE_DIR is cold) ...",
              flush=True)
        from bench import compile_report

        report["compile"] = compile_report.bench_section()
        print("host work per step ...", flush=True)
        from bench import host_time

        report["host_work"] = host_time.report(ckpt)
        report["host_work"]["engine_overhead_ms"] = {str(n): host_time.engine_overhead_ms(ckpt, n) for n in (1, 64)}
        report["host_work"]["engine_overhead_targets_ms"] = {"1": 0.5, "64": 2.0}
        print("baseline (HF generate, serial) ...", flush=True)
        base_model = hf_model(ckpt)
        hf_generate(base_model, tok.encode(texts[0]), 4)  # warm-up
        base, base_tokens = baseline_tok_s(base_model, [tok.encode(t) for t in texts[:a.baseline_requests]],
                                           a.max_new_tokens)
        del base_model
        report["baseline"] = {"tok_s": base, "requests": a.baseline_requests, "tokens": base_tokens}
        server = Server(ckpt, slots=max(levels))
        try:
            stream_one(server.url, texts[0], 4)  # warm-up
            report["throughput"] = {}
            for c in levels:
                print(f"throughput at concurrency {c} ...", flush=True)
                r = run_concurrency(server.url, texts[: max(c, 4)], c, a.max_new_tokens)
                r["baseline_tok_s"] = base
                r["ratio"] = r["engine_tok_s"] / base
                report["throughput"][str(c)] = r
        finally:
            server.stop()
        if not a.skip_batch:
            print("batch ...", flush=True)
            from bench.batch_bench import run_bench

            report["batch"] = run_bench(model_dir=str(ckpt))
        if not a.skip_multiturn:
            print("multiturn (prefix reuse off / on) ...", flush=True)
            from bench.multiturn import run_multiturn

            report["multiturn"] = run_multiturn(ckpt)
        if not a.skip_grammar:
            print("grammar: constrained vs free at 32 streams, masks at 64 rows ...", flush=True)
            from bench import grammar_bench

            report["grammar"] = grammar_bench.report(ckpt)
        if not a.skip_shared_prompt:
            print("shared system prompt (reuse off / on, ~6 min on 2 cores) ...", flush=True)
            from bench.shared_prompt import run_shared_prompt

            report["shared_prompt"] = run_shared_prompt(ckpt, users=32, rounds=1)
        if not a.skip_forks:
            print("forks (n=8 vs 8 separate requests) ...", flush=True)
            from bench.forks import run_forks

            report["forks"] = run_forks(ckpt)
        if not a.skip_lora:
            print("lora (32 streams: 4 adapters of rank 16 vs base only) ...", flush=True)
            from bench.lora_bench import run as run_lora

            report["lora"] = run_lora()
        if not a.skip_mid:
            print("mid checkpoint through HTTP (~5 min) ...", flush=True)
            from bench.mid import MID, run_mid

            report["mid"] = run_mid(build_checkpoint(Path(tmp) / "mid", **MID))
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"{platform.node() or 'host'}-{dt.date.today().isoformat()}.json"
    text = json.dumps(report, indent=2, default=float)
    (RESULTS / name).write_text(text + "\n")
    (RESULTS / "latest-cpu.json").write_text(text + "\n")
    print_table(report)
    print(f"wrote bench/results/{name} and bench/results/latest-cpu.json")
    return 0


def print_table(r: dict) -> None:
    p = r["parity"]
    print(f"\nmachine: {r['machine']}")
    print(f"parity: greedy_match={p['greedy_match']} ({p['matching_cases']}/{p['cases']})")
    print(f"{'conc':>5} {'engine tok/s':>13} {'HF tok/s':>9} {'ratio':>6} {'ttft p50':>9} {'tpot p50':>9} {'tpot p99':>9}")
    for c, t in r.get("throughput", {}).items():
        print(f"{c:>5} {t['engine_tok_s']:>13.1f} {t['baseline_tok_s']:>9.1f} {t['ratio']:>6.1f} "
              f"{t['ttft_p50_ms']:>7.0f}ms {t['tpot_p50_ms']:>7.1f}ms {t['tpot_p99_ms']:>7.1f}ms")
    m = r["memory"]
    print(f"memory per seq at {m['tokens']} tokens: {m['state_bytes_per_seq']} B (formula {m['formula_bytes_per_seq']} B)")
    if "decode_device_work" in r:
        n, kv = r["decode_device_work"]["launches_per_decode_step"], r["decode_device_work"]["decode_kv_bytes"]
        print(f"launches per decode step: {n['before']['launches']} -> {n['after']['launches']} "
              f"(target <= {n['target']}); decode KV bytes {kv['paged_ratio']:.2f}x ideal "
              f"(gather {kv['gather_ratio']:.2f}x; target <= {kv['target_ratio']}x)")
    for version, c in r.get("compile", {}).items():
        print(f"compile ({version}): " + ("; ".join(
            f"{arch} {sum(k['variants'] for k in a['kernels']['serving'].values())} variants, deterministic picks <= "
            f"{max(k['smem_max'] or 0 for k in a['kernels']['deterministic'].values()) / 1024:.0f} KB"
            for arch, a in c["archs"].items()) if "archs" in c else c["error"][-200:])
              + f"; problems: {len(c.get('problems', []))}")
    if "host_work" in r:
        print(f"host ms per step: {json.dumps(r['host_work']['host_ms_per_step'])} (before "
              f"{json.dumps(r['host_work']['before_ms'])}; targets {json.dumps(r['host_work']['targets_ms'])})")
    if "batch" in r:
        print(f"batch: {json.dumps(r['batch'])}")
    if "forks" in r:
        print(f"forks: {json.dumps({k: v for k, v in r['forks'].items() if not isinstance(v, dict)})}")
    if "multiturn" in r:
        print(f"multiturn: {json.dumps({k: v for k, v in r['multiturn'].items() if not isinstance(v, dict)})}")
    if "grammar" in r:
        g, t = r["grammar"], r["grammar"]["throughput"]
        print(f"grammar: 32 streams constrained {t['constrained_tok_s']} vs free {t['free_tok_s']} tok/s = "
              f"{t['ratio']}x (target >= 0.9); masks at 64 rows: "
              + ", ".join(f"{k} {v['mask_ms_per_step_mean']} ms/step" for k, v in g["mask_host"].items()
                          if isinstance(v, dict)))
    if "shared_prompt" in r:
        print(f"shared_prompt: {json.dumps({k: v for k, v in r['shared_prompt'].items() if not isinstance(v, dict)})}")
    if "mid" in r:
        m = r["mid"]
        for k in ("1", "8", "32_token_bounded", "32_time_bounded"):
            t = m[k]
            print(f"mid {k:>17}: {t['engine_tok_s']:.1f} tok/s, TTFT p50 {t['ttft_p50_ms']:.0f} ms, TPOT p50 "
                  f"{t['tpot_p50_ms']:.1f} / p99 {t['tpot_p99_ms']:.1f} ms ({t['tpot_p99_over_p50']:.1f}x)")


if __name__ == "__main__":
    raise SystemExit(main())
