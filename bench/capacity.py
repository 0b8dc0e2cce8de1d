"""Capacity table: SageMaker GPU instance -> replicas and concurrent sequences at 8K / 32K / 128K context.

    python -m bench.capacity            # markdown tables (README)
    python -m bench.capacity --json     # the same numbers as JSON (bench/results/capacity.json)

Arithmetic only (no GPU): the full-size Granite 4.0 H micro architecture (bench/micro_config.json)
through the engine's own memory accounting (model/runtime/state.py): per sequence a fixed Mamba state
(conv + SSM, all Mamba layers) plus KV per token for the attention layers, in bf16 (the CUDA
defaults: DTYPE=auto -> bf16, SSM_STATE_DTYPE=auto -> the model dtype). One replica (gunicorn
worker, its own engine and weights) per GPU. Per GPU, what the engine can give to sequences is
    (memory_after_weights_and_context * CUDA_FREE_FRACTION) - CUDA_FIXED_RESERVE - largest prefill step
and each sequence costs its state, its KV and its share of the widest decode graph's temporaries
(model/runtime/state.py: decode_step_bytes; on CUDA decode attention is the paged kernel, which reads KV in place,
so that share is only its per-split partial results), so the table follows the engine. The largest prefill
step (prefill_step_bytes at the engine defaults MAX_STEP_TOKENS / PREFILL_CHUNK_TOKENS, sequences up to the
context, as many slots as sequences fit) holds activations, padded views and the attention's temporaries:
gathered K / V linear in the context and no (queries x keys) term. `was_mask_gib` is what the old prefill
attention added on top, unbudgeted: its (L, Tk) mask tiled per KV group and SDPA's copy of it in bf16.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from model.network.arch import GraniteArch
from model.runtime.state import (
    CUDA_FIXED_RESERVE,
    CUDA_FREE_FRACTION,
    decode_step_bytes,
    kv_bytes_per_token,
    prefill_attention_bytes,
    prefill_step_bytes,
    state_bytes_per_seq,
)
from model.types import EngineConfig

MICRO_CONFIG = Path(__file__).with_name("micro_config.json")
MIB = 2**20
GIB = 2**30
WEIGHT_BYTES = 6.38e9  # 3.19B parameters in bf16 (GRANITE.md)
CUDA_CONTEXT_BYTES = 600 * MIB  # CUDA context + cuBLAS/cuDNN handles + allocator rounding, measured order
CONTEXTS = (8192, 32768, 131072)
STEP_TOKENS = EngineConfig().max_step_tokens  # MAX_STEP_TOKENS default (2048)
CHUNK_TOKENS = EngineConfig().prefill_chunk_tokens  # PREFILL_CHUNK_TOKENS default (512)


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_mib: int  # what the driver reports as total (nvidia-smi), not the marketing number


A10G = Gpu("A10G", 23028)
L40S = Gpu("L40S", 46068)
A100_40 = Gpu("A100 40GB", 40960)
H100_80 = Gpu("H100 80GB", 81559)

INSTANCES: list[tuple[str, int, Gpu]] = [
    ("ml.g5.xlarge", 1, A10G),
    ("ml.g5.2xlarge", 1, A10G),
    ("ml.g5.4xlarge", 1, A10G),
    ("ml.g5.8xlarge", 1, A10G),
    ("ml.g5.16xlarge", 1, A10G),
    ("ml.g5.12xlarge", 4, A10G),
    ("ml.g5.24xlarge", 4, A10G),
    ("ml.g5.48xlarge", 8, A10G),
    ("ml.g6e.xlarge", 1, L40S),
    ("ml.g6e.2xlarge", 1, L40S),
    ("ml.g6e.4xlarge", 1, L40S),
    ("ml.g6e.8xlarge", 1, L40S),
    ("ml.g6e.16xlarge", 1, L40S),
    ("ml.g6e.12xlarge", 4, L40S),
    ("ml.g6e.24xlarge", 4, L40S),
    ("ml.g6e.48xlarge", 8, L40S),
    ("ml.p4d.24xlarge", 8, A100_40),
    ("ml.p5.48xlarge", 8, H100_80),
]


def micro_arch(path: Path = MICRO_CONFIG) -> GraniteArch:
    from transformers import GraniteMoeHybridConfig

    return GraniteArch.from_hf_config(GraniteMoeHybridConfig(**json.loads(path.read_text())))


def available_bytes(gpu: Gpu) -> int:
    """Bytes after weights, CUDA context, the free fraction and the fixed reserve: for sequences and steps."""
    after_weights = gpu.memory_mib * MIB - WEIGHT_BYTES - CUDA_CONTEXT_BYTES
    return max(0, int(after_weights * CUDA_FREE_FRACTION) - CUDA_FIXED_RESERVE)


def prefill_bytes(arch: GraniteArch, ctx: int, slots: int, dtype=torch.bfloat16) -> int:
    """The largest prefill step's temporaries with `slots` sequences of up to ctx tokens (the engine's rule)."""
    return prefill_step_bytes(arch, STEP_TOKENS, slots, dtype, ctx, CHUNK_TOKENS)


def sequence_budget_bytes(gpu: Gpu, arch: GraniteArch, ctx: int, slots: int, dtype=torch.bfloat16) -> int:
    """Bytes one replica's engine can spend on `slots` sequences of up to ctx tokens: state, KV and decode
    temporaries, once the largest prefill step and the pool's dummy slot (padded graph rows) are kept back."""
    dummy = state_bytes_per_seq(arch, dtype, dtype)
    return max(0, available_bytes(gpu) - prefill_bytes(arch, ctx, slots, dtype) - dummy)


def per_seq_bytes(arch: GraniteArch, tokens: int, dtype=torch.bfloat16) -> int:
    """State + KV of one sequence of `tokens`, plus what it adds to the widest decode graph."""
    return (state_bytes_per_seq(arch, dtype, dtype) + tokens * kv_bytes_per_token(arch, dtype)
            + decode_step_bytes(arch, 1, tokens, dtype, paged=True))


def seqs_per_gpu(gpu: Gpu, arch: GraniteArch, ctx: int) -> int:
    """The most sequences n of ctx tokens with n x per_seq_bytes <= sequence_budget_bytes(n slots): the prefill
    step grows with the slots (padded rows, logits), so n is searched, not divided out."""
    n = 0
    while (n + 1) * per_seq_bytes(arch, ctx) <= sequence_budget_bytes(gpu, arch, ctx, n + 1):
        n += 1
    return n


def was_mask_bytes(arch: GraniteArch, ctx: int, dtype=torch.bfloat16) -> int:
    """The old prefill attention's quadratic temporaries for one chunk of CHUNK_TOKENS at ctx keys: the bool
    (L, Tk) mask, its copy tiled over the q_heads / kv_heads query heads of each KV head, and SDPA's copy of
    that in the query dtype (what memory-efficient attention reads; its math path would hold fp32 scores)."""
    rep, pairs = arch.n_heads // arch.n_kv_heads, CHUNK_TOKENS * ctx
    return pairs + rep * pairs + rep * pairs * torch.empty((), dtype=dtype).element_size()


def capacity(arch: GraniteArch | None = None) -> list[dict]:
    arch = arch or micro_arch()
    per_gpu = {gpu.name: {ctx: seqs_per_gpu(gpu, arch, ctx) for ctx in CONTEXTS} for _, _, gpu in INSTANCES}
    rows = []
    for name, n_gpus, gpu in INSTANCES:
        n = per_gpu[gpu.name]
        rows.append({
            "instance": name, "gpus": n_gpus, "gpu": gpu.name, "gpu_memory_gib": round(gpu.memory_mib / 1024, 1),
            "replicas": n_gpus,
            "available_gib_per_gpu": round(available_bytes(gpu) / GIB, 1),
            **{f"prefill_step_gib_{ctx // 1024}k": round(prefill_bytes(arch, ctx, max(n[ctx], 1)) / GIB, 2)
               for ctx in CONTEXTS},
            **{f"seqs_{ctx // 1024}k_per_gpu": n[ctx] for ctx in CONTEXTS},
            **{f"seqs_{ctx // 1024}k_total": n[ctx] * n_gpus for ctx in CONTEXTS},
        })
    return rows


def per_gpu_rows(rows: list[dict], arch: GraniteArch) -> list[dict]:
    """One row per GPU kind: the prefill step's temporaries (its attention part apart) at each context."""
    out, seen = [], set()
    for r in rows:
        if r["gpu"] in seen:
            continue
        seen.add(r["gpu"])
        d = {"gpu": r["gpu"], "instances": [x["instance"] for x in rows if x["gpu"] == r["gpu"]],
             "available_gib": r["available_gib_per_gpu"]}
        for ctx in CONTEXTS:
            k, n = f"{ctx // 1024}k", max(r[f"seqs_{ctx // 1024}k_per_gpu"], 1)
            d[f"prefill_step_gib_{k}"] = r[f"prefill_step_gib_{k}"]
            d[f"prefill_attention_gib_{k}"] = round(prefill_attention_bytes(
                arch, STEP_TOKENS, n, ctx, CHUNK_TOKENS, torch.bfloat16) / GIB, 2)
            d[f"was_mask_gib_{k}"] = round(was_mask_bytes(arch, ctx) / GIB, 2)
            d[f"seqs_{k}"] = r[f"seqs_{k}_per_gpu"]
        out.append(d)
    return out


def markdown(rows: list[dict], arch: GraniteArch) -> str:
    state = state_bytes_per_seq(arch, torch.bfloat16, torch.bfloat16)
    kv = kv_bytes_per_token(arch, torch.bfloat16)
    graph = decode_step_bytes(arch, 1, 8192, torch.bfloat16, paged=True)
    ks = [f"{c // 1024}K" for c in CONTEXTS]
    lines = [
        "| instance | GPUs | GPU memory | replicas | " + " | ".join(f"seqs at {k} (total)" for k in ks) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in ks) + " |",
    ]
    for r in rows:
        cells = " | ".join(f"{r[f'seqs_{c // 1024}k_per_gpu']}/GPU ({r[f'seqs_{c // 1024}k_total']})" for c in CONTEXTS)
        lines.append(f"| {r['instance']} | {r['gpus']} x {r['gpu']} | {r['gpu_memory_gib']} GiB | {r['replicas']} | {cells} |")
    lines += [
        "",
        "Per GPU: what is left for sequences and steps, and the largest prefill step's temporaries kept back "
        f"from it (MAX_STEP_TOKENS {STEP_TOKENS}, PREFILL_CHUNK_TOKENS {CHUNK_TOKENS}, as many slots as "
        "sequences fit); in brackets the attention's share (gathered K / V, padded queries and outputs), "
        "then what the old prefill attention's (L, Tk) mask added, unbudgeted:",
        "",
        "| GPU | available | " + " | ".join(f"prefill step at {k} (attention) | was: mask at {k}" for k in ks) + " |",
        "| --- | --- | " + " | ".join("--- | ---" for _ in ks) + " |",
    ]
    for d in per_gpu_rows(rows, arch):
        cells = " | ".join(f"{d[f'prefill_step_gib_{c // 1024}k']} GiB ({d[f'prefill_attention_gib_{c // 1024}k']}) "
                           f"| +{d[f'was_mask_gib_{c // 1024}k']} GiB" for c in CONTEXTS)
        lines.append(f"| {d['gpu']} | {d['available_gib']} GiB | {cells} |")
    lines += [
        "",
        f"Per sequence (bf16): Mamba state {state / MIB:.1f} MiB fixed + KV {kv / 1024:.0f} KiB per token "
        f"+ {graph / 1024:.0f} KiB of decode-graph temporaries at 8K (activations and the paged attention "
        "kernel's partial results; it reads KV in place) "
        + ", ".join(f"= {per_seq_bytes(arch, c) / MIB:.0f} MiB at {c // 1024}K" for c in CONTEXTS)
        + f". Per GPU: weights {WEIGHT_BYTES / 1e9:.2f} GB and ~{CUDA_CONTEXT_BYTES // MIB} MiB CUDA context off "
        f"the top, then {CUDA_FREE_FRACTION:.0%} of the rest minus {CUDA_FIXED_RESERVE // GIB} GiB (\"available\"), "
        "minus the largest prefill step (model/runtime/state.py). The engine admits at most MAX_CONCURRENT_SEQS (default "
        "32) sequences per replica: raise it to use the room shown here.",
    ]
    return "\n".join(lines)


def report(arch: GraniteArch | None = None) -> dict:
    """The tables as JSON (`make bench`'s capacity section, bench/results/capacity.json)."""
    arch = arch or micro_arch()
    rows = capacity(arch)
    return {"step_tokens": STEP_TOKENS, "chunk_tokens": CHUNK_TOKENS, "contexts": list(CONTEXTS), "instances": rows,
            "per_gpu": per_gpu_rows(rows, arch)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON instead of the markdown table")
    args = ap.parse_args(argv)
    arch = micro_arch()
    print(json.dumps(report(arch), indent=1) if args.json else markdown(capacity(arch), arch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
