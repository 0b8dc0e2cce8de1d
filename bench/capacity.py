"""Capacity table: SageMaker GPU instance -> replicas and concurrent sequences at 4K / 32K context.

    python -m bench.capacity            # markdown table (README)
    python -m bench.capacity --json     # the same numbers as JSON

Arithmetic only (no GPU): the full-size Granite 4.0 H micro architecture (bench/micro_config.json)
through the engine's own memory accounting (model/state.py): per sequence a fixed Mamba state
(conv + SSM, all Mamba layers) plus KV per token for the attention layers, in bf16 (the CUDA
defaults: DTYPE=auto -> bf16, SSM_STATE_DTYPE=auto -> the model dtype). One replica (gunicorn
worker, its own engine and weights) per GPU. Per GPU, what the engine can give to sequences is
    (memory_after_weights_and_context * CUDA_FREE_FRACTION) - CUDA_FIXED_RESERVE - largest prefill step
and each sequence costs its state, its KV and its share of the widest decode graph's temporaries
(model/state.py: decode_step_bytes; on CUDA decode attention is the paged kernel, which reads KV in place,
so that share is only its per-split partial results), so the table follows the engine.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from model.arch import GraniteArch
from model.state import (
    CUDA_FIXED_RESERVE,
    CUDA_FREE_FRACTION,
    decode_step_bytes,
    kv_bytes_per_token,
    prefill_step_bytes,
    state_bytes_per_seq,
)

MICRO_CONFIG = Path(__file__).with_name("micro_config.json")
MIB = 2**20
GIB = 2**30
WEIGHT_BYTES = 6.38e9  # 3.19B parameters in bf16 (GRANITE.md)
CUDA_CONTEXT_BYTES = 600 * MIB  # CUDA context + cuBLAS/cuDNN handles + allocator rounding, measured order
CONTEXTS = (4096, 32768)
STEP_TOKENS = 2048  # MAX_STEP_TOKENS default


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


def sequence_budget_bytes(gpu: Gpu, arch: GraniteArch, dtype=torch.bfloat16) -> int:
    """Bytes one replica's engine can spend on sequences: state, KV and decode temporaries (the engine's
    own rule, with a prefill step's logits for up to STEP_TOKENS sequences)."""
    after_weights = gpu.memory_mib * MIB - WEIGHT_BYTES - CUDA_CONTEXT_BYTES
    prefill = prefill_step_bytes(arch, STEP_TOKENS, STEP_TOKENS, dtype)
    return max(0, int(after_weights * CUDA_FREE_FRACTION) - CUDA_FIXED_RESERVE - prefill)


def per_seq_bytes(arch: GraniteArch, tokens: int, dtype=torch.bfloat16) -> int:
    """State + KV of one sequence of `tokens`, plus what it adds to the widest decode graph."""
    return (state_bytes_per_seq(arch, dtype, dtype) + tokens * kv_bytes_per_token(arch, dtype)
            + decode_step_bytes(arch, 1, tokens, dtype, paged=True))


def capacity(arch: GraniteArch | None = None) -> list[dict]:
    arch = arch or micro_arch()
    rows = []
    for name, n_gpus, gpu in INSTANCES:
        budget = sequence_budget_bytes(gpu, arch)
        per_gpu = {ctx: budget // per_seq_bytes(arch, ctx) for ctx in CONTEXTS}
        rows.append({
            "instance": name, "gpus": n_gpus, "gpu": gpu.name, "gpu_memory_gib": round(gpu.memory_mib / 1024, 1),
            "replicas": n_gpus,
            "sequence_budget_gib_per_gpu": round(budget / GIB, 1),
            **{f"seqs_{ctx // 1024}k_per_gpu": per_gpu[ctx] for ctx in CONTEXTS},
            **{f"seqs_{ctx // 1024}k_total": per_gpu[ctx] * n_gpus for ctx in CONTEXTS},
        })
    return rows


def markdown(rows: list[dict], arch: GraniteArch) -> str:
    state = state_bytes_per_seq(arch, torch.bfloat16, torch.bfloat16)
    kv = kv_bytes_per_token(arch, torch.bfloat16)
    graph = decode_step_bytes(arch, 1, 4096, torch.bfloat16, paged=True)
    lines = [
        "| instance | GPUs | GPU memory | replicas | for sequences / GPU | seqs at 4K (total) | seqs at 32K (total) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['instance']} | {r['gpus']} x {r['gpu']} | {r['gpu_memory_gib']} GiB | {r['replicas']} "
            f"| {r['sequence_budget_gib_per_gpu']} GiB | {r['seqs_4k_per_gpu']}/GPU ({r['seqs_4k_total']}) "
            f"| {r['seqs_32k_per_gpu']}/GPU ({r['seqs_32k_total']}) |")
    lines += [
        "",
        f"Per sequence (bf16): Mamba state {state / MIB:.1f} MiB fixed + KV {kv / 1024:.0f} KiB per token "
        f"+ {graph / 1024:.0f} KiB of decode-graph temporaries at 4K (activations and the paged attention "
        "kernel's partial results; it reads KV in place) "
        f"= {per_seq_bytes(arch, 4096) / MIB:.0f} MiB at 4K, {per_seq_bytes(arch, 32768) / MIB:.0f} MiB at 32K. "
        f"Per GPU: weights {WEIGHT_BYTES / 1e9:.2f} GB and ~{CUDA_CONTEXT_BYTES // MIB} MiB CUDA context off the "
        f"top, then {CUDA_FREE_FRACTION:.0%} of the rest minus {CUDA_FIXED_RESERVE // GIB} GiB and the largest "
        "prefill step's temporaries (model/state.py). The engine admits at most MAX_CONCURRENT_SEQS (default 32) "
        "sequences per replica: raise it to use the room shown here.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON instead of the markdown table")
    args = ap.parse_args(argv)
    arch = micro_arch()
    rows = capacity(arch)
    print(json.dumps(rows, indent=1) if args.json else markdown(rows, arch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
