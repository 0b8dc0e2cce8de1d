"""GPU benchmark: the full-size Granite 4.0 H micro architecture with random bf16 weights, built on the GPU.

    python bench/gpu_bench.py --out bench/results/gpu.json [--steps 64] [--prompt 128] [--max-batch 128]
                              [--hf-steps N] [--kernels fused|reference] [--conv fused|torch]

(`--config`/`--device cpu` exist so tests can smoke-run the same code on a tiny config without a GPU.)

Measures, on one GPU: batch-1 decode tokens/s (CUDA graphs and eager), the share of the memory-bandwidth
roofline that reaches (bytes read per decode step x steps/s / peak bandwidth of the card), aggregate
decode tokens/s over a concurrency sweep 1..max-batch, packed prefill tokens/s (all of a sweep point's
prompts in one step), and Hugging Face `generate` on the same weights (batch 1, decode tokens/s with its
prefill taken out, as the engine's) as the baseline, all in the same run. Speed does not depend on weight
values. Every (batch, width) decode graph is captured in warmup, outside the timed loops (the report
counts the timed steps that found none: 0). The run claims a kernel path (--kernels, --conv: fused on
CUDA by default) and refuses to report numbers (exit 3) when any op ran another one; the report names the
kernel per op.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model.network.granite import FP32_PARAMS, GraniteArch, GraniteForCausalLM  # noqa: E402
from model.runtime.runner import ModelRunner  # noqa: E402
from model.types import EngineConfig, SeqChunk, StepBatch  # noqa: E402

MICRO_CONFIG = ROOT / "bench" / "micro_config.json"
# Peak DRAM bandwidth, bytes/s, by a substring of torch.cuda.get_device_name() (first match wins).
PEAK_BW = [  # GH200 before H200: "NVIDIA GH200 480GB" contains "H200"
    ("GH200", 4.0e12), ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12),
    ("L40", 0.864e12), ("A10G", 0.6e12), ("A10", 0.6e12), ("L4", 0.3e12), ("V100", 0.9e12), ("T4", 0.32e12),
]


def peak_bandwidth(name: str) -> float | None:
    for key, bw in PEAK_BW:
        if key in name:
            return bw
    return None


def hf_config(path: Path = MICRO_CONFIG):
    from transformers import GraniteMoeHybridConfig

    cfg = json.loads(Path(path).read_text())
    cfg.pop("architectures", None)
    cfg.pop("torch_dtype", None)
    return GraniteMoeHybridConfig(**cfg)


@torch.no_grad()
def init_random_(model: GraniteForCausalLM, seed: int = 0) -> GraniteForCausalLM:
    """Plausible random weights in place: small normal matrices, unit norms, Mamba-2's A / dt / D init."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("norm.weight") or "layernorm" in name:
            p.fill_(1.0)
        elif leaf == "A_log":
            p.copy_(torch.log(torch.empty_like(p).uniform_(1, 16, generator=g)))
        elif leaf == "D":
            p.fill_(1.0)
        elif leaf == "dt_bias":  # softplus^-1 of dt ~ logU(1e-3, 1e-1)
            dt = torch.exp(torch.empty_like(p).uniform_(math.log(1e-3), math.log(1e-1), generator=g))
            p.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=g)
    return model


def build_full_size(device: str = "cuda", dtype=torch.bfloat16, seed: int = 0,
                    config: Path = MICRO_CONFIG) -> GraniteForCausalLM:
    """Random weights allocated straight on `device` in `dtype` (A_log, D, dt_bias in fp32, as loaded)."""
    arch = GraniteArch.from_hf_config(hf_config(config))
    with torch.device("meta"):
        model = GraniteForCausalLM(arch).to(dtype)
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] in FP32_PARAMS:
            p.data = p.data.float()
    model = model.to_empty(device=device)
    return init_random_(model, seed).eval().requires_grad_(False)


MAMBA_OPS = ("ssd_prefill", "ssm_decode")
CONV_OPS = ("conv_prefill", "conv_decode")


def claimed_path(kernels: str, conv: str) -> dict[str, str]:
    """What each op must run for this benchmark's numbers to mean what they say: "fused" or "reference"."""
    claim = {op: kernels for op in MAMBA_OPS + CONV_OPS}
    if conv == "torch":
        claim.update({op: "reference" for op in CONV_OPS})
    return claim


def path_mismatches(report: dict[str, str], claim: dict[str, str]) -> list[str]:
    """Ops whose kernel (runner.kernel_report: "fused:<kernel>" or "reference") is not the claimed path."""
    return [f"{op}: claimed {want}, ran {report.get(op)}" for op, want in claim.items()
            if report.get(op, "").split(":")[0] != want]


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode_rate(runner: ModelRunner, batch: int, prompt: int, steps: int) -> dict:
    """Prefill `batch` sequences of `prompt` tokens in one packed step (timed), then time `steps` decode
    steps of all of them."""
    slots = [runner.allocator.allocate(prompt + steps + 2) for _ in range(batch)]
    ids = tuple((7 * i) % 1000 + 3 for i in range(prompt))
    unprepared = runner.static.unprepared_runs if runner.static is not None else 0
    _sync()
    t0 = time.perf_counter()
    logits = runner.forward(StepBatch(tuple(SeqChunk.fresh(s, ids, True) for s in slots)))
    _sync()
    prefill_s = time.perf_counter() - t0
    toks = logits.argmax(-1).tolist()
    first = [toks[0]]
    t0 = time.perf_counter()
    for step in range(steps):
        out = runner.forward(StepBatch(tuple(SeqChunk.decode(s, t, prompt + step)
                                             for s, t in zip(slots, toks, strict=True))))
        toks = out.argmax(-1).tolist()  # the host needs the tokens, as the engine does
        first.append(toks[0])
    _sync()
    dt = time.perf_counter() - t0
    for s in slots:
        runner.allocator.free(s)
    return {"batch": batch, "decode_steps": steps, "decode_s": dt, "step_ms": 1e3 * dt / steps,
            "tokens_per_s": batch * steps / dt, "prefill_tokens_per_s": batch * prompt / prefill_s,
            "uncaptured_steps": (runner.static.unprepared_runs - unprepared) if runner.static is not None else None,
            "tokens": first[:steps]}


def hf_generate_rate(model: GraniteForCausalLM, prompt: int, steps: int, config: Path = MICRO_CONFIG) -> dict:
    """transformers' GraniteMoeHybridForCausalLM sharing the same weight tensors, batch 1, greedy. Its
    decode rate leaves the prefill out, as the engine's does: (steps - 1) tokens over generate(steps) minus
    generate(1) (prefill + first token)."""
    from transformers import GraniteMoeHybridForCausalLM

    device = next(model.parameters()).device
    with torch.device("meta"):
        hf = GraniteMoeHybridForCausalLM(hf_config(config))
    sd = dict(model.state_dict())
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    hf.load_state_dict(sd, strict=True, assign=True)
    hf = hf.eval().to(device)
    ids = torch.tensor([[(7 * i) % 1000 + 3 for i in range(prompt)]], device=device)
    kw = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
    hf.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up

    def timed(gen, n):
        _sync()
        t0 = time.perf_counter()
        out = gen(ids, **{**kw, "max_new_tokens": n, "min_new_tokens": n})
        _sync()
        return time.perf_counter() - t0, out

    first_s, _ = timed(hf.generate, 1)
    dt, out = timed(hf.generate, steps)
    decode_s = max(dt - first_s, 1e-9)
    res = {"batch": 1, "new_tokens": steps, "seconds": dt, "prefill_and_first_token_s": first_s,
           "tokens_per_s": (steps - 1) / decode_s, "tokens_per_s_with_prefill": steps / dt,
           "tokens": out[0, prompt:].tolist()}
    del hf
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON report path")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=128)
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face generate baseline")
    ap.add_argument("--hf-steps", type=int, default=None, help="tokens the HF baseline generates (default --steps)")
    ap.add_argument("--config", type=Path, default=MICRO_CONFIG, help="config.json (default: the micro)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    ap.add_argument("--kernels", choices=("fused", "reference"), default=None,
                    help="the kernel path this run claims (default: fused on CUDA, reference on CPU)")
    ap.add_argument("--conv", choices=("fused", "torch"), default="fused",
                    help="torch: the causal conv runs the torch reference (causal-conv1d not built)")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("gpu_bench: CUDA is not available", file=sys.stderr)
        return 2
    kernels = args.kernels or ("fused" if cuda else "reference")
    claim = claimed_path(kernels, args.conv)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    report: dict = {"device": name, "torch": torch.__version__, "config": str(args.config),
                    "prompt_tokens": args.prompt, "claimed_path": claim,
                    # MAMBA_DETERMINISTIC=1 (make gpu-check): one autotune config per mamba-ssm kernel, no tuning
                    "autotune": "deterministic" if os.environ.get("MAMBA_DETERMINISTIC", "")[:1] == "1" else "tuned"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = build_full_size(args.device, torch.bfloat16 if cuda else torch.float32, config=args.config)
    report["build_s"] = time.perf_counter() - t0
    wbytes = weight_bytes(model)
    report["weight_bytes"] = wbytes
    report["parameters"] = sum(p.numel() for p in model.parameters())
    max_total = args.prompt + args.steps + 64
    # "fused" with --conv torch: the Mamba ops must be fused, the conv the reference (checked below)
    mode_kernels = "auto" if (kernels == "fused" and args.conv == "torch") else kernels
    cfg = EngineConfig(max_concurrent_seqs=args.max_batch, max_input_tokens=args.prompt + 1,
                       max_total_tokens=max_total, max_step_tokens=args.max_batch * args.prompt,
                       kv_cache_tokens=args.max_batch * max_total, device=args.device, kernels=mode_kernels)
    runs = {}
    for mode in ("graph", "eager") if cuda else ("static", "eager"):
        runner = ModelRunner(None, cfg, decode_mode=mode, model=model)
        wrong = path_mismatches(runner.kernel_report, claim)
        if wrong:  # never report numbers for a path other than the claimed one
            report.update(error=f"kernel path is not the claimed one: {wrong}", kernels=runner.kernel_report)
            out.write_text(json.dumps(report, indent=2))
            print(f"gpu_bench: refusing to report: {report['error']}", file=sys.stderr)
            return 3
        t0 = time.perf_counter()
        runner.warmup()
        warm = time.perf_counter() - t0
        one = decode_rate(runner, 1, args.prompt, args.steps)
        runs[mode] = {"warmup_s": warm, "batch1": one, "kernels": runner.kernel_report}
        if runner.static is not None:
            runs[mode]["decode_graphs"] = dict(runner.static.report)
        if mode in ("graph", "static"):
            report["memory"] = runner.memory_report()
            sweep, b = [], 1
            while b <= args.max_batch:
                sweep.append(decode_rate(runner, b, args.prompt, max(8, args.steps // 2)))
                print(f"batch {b:4d}: {sweep[-1]['tokens_per_s']:9.1f} tok/s", flush=True)
                b *= 2
            report["concurrency_sweep"] = sweep
            # decode steps of the timed loops that found no prepared graph (0: no capture was timed)
            report["timed_uncaptured_steps"] = sum(r["uncaptured_steps"] for r in [one, *sweep])
        del runner
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    report["engine"] = runs
    report["kernels"] = runs["graph" if cuda else "static"]["kernels"]
    # Bytes a batch-1 decode step must read: every weight once (embedding = tied LM head) + Mamba state
    # read and written + the KV read so far. The roofline is that over the card's peak bandwidth.
    mem = report["memory"]
    step_bytes = wbytes + 2 * mem["state_bytes_per_seq"] + mem["kv_bytes_per_token"] * (args.prompt + args.steps)
    bw = peak_bandwidth(name)
    report["roofline"] = {"peak_bandwidth_Bps": bw, "bytes_per_decode_step": step_bytes}
    if bw:
        for mode, r in runs.items():
            tps = r["batch1"]["tokens_per_s"]
            report["roofline"][f"{mode}_percent"] = 100.0 * step_bytes * tps / bw
            report["roofline"][f"{mode}_percent_weights_only"] = 100.0 * wbytes * tps / bw
        report["roofline"]["max_batch1_tokens_per_s"] = bw / step_bytes
    if not args.no_hf:
        try:
            report["hf_generate"] = hf_generate_rate(model, args.prompt, args.hf_steps or args.steps, args.config)
            best = runs["graph" if cuda else "static"]["batch1"]
            report["speedup_vs_hf_batch1"] = best["tokens_per_s"] / report["hf_generate"]["tokens_per_s"]
            hf_toks = report["hf_generate"]["tokens"]
            same = next((i for i, (x, y) in enumerate(zip(best["tokens"], hf_toks, strict=False)) if x != y),
                        min(len(hf_toks), len(best["tokens"])))
            report["greedy_same_prefix_vs_hf"] = same  # bf16: rounding may diverge after a while
        except Exception as e:  # noqa: BLE001 - the baseline failing must not lose the engine numbers
            report["hf_generate"] = {"error": repr(e)}
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k not in ("concurrency_sweep",)}, indent=2,
                     default=str)[:4000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
