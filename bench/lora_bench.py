"""LoRA adapters (issue 21), the engine in-process on the demo checkpoint, measured in one run:

  throughput    aggregate generated tokens/s at 32 concurrent streams: base only (MAX_LORAS=0) vs 4 adapters of
                rank 16 on every target spread over the rows (8 streams each), rounds alternated; target >= 0.8x
  registration  seconds per register_adapter (read, check, digest, host copy) for a rank-16 all-target adapter
  bytes         host bytes per adapter and the device stacks against their formulas:
                adapter = r x sum over its targets of (in + out) x dtype bytes;
                stacks  = MAX_LORAS x MAX_LORA_RANK x sum over all targets of (in + out) x dtype bytes
                (and the same formulas for the full-size micro, arithmetic only)

    python -m bench.lora_bench [--streams 32] [--new 32] [--rounds 2] [--out bench/results/lora-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.http_load import machine_name
from model.checkpoint.adapters import target_shapes
from model.checkpoint.demo import build_checkpoint
from model.engine.engine import Engine
from model.network.arch import GraniteArch
from model.network.lora import lora_bytes
from model.types import EngineConfig, GenerationRequest, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
RANK = 16


def write_adapter(out: Path, arch: GraniteArch, seed: int, rank: int = RANK) -> Path:
    """A PEFT-format adapter (what peft's save_pretrained writes) with random non-zero A and B on every target."""
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (n_in, n_out) in target_shapes(arch).items():
        sd[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) * 0.05
        sd[f"base_model.model.{name}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * 0.05
    save_file(sd, str(out / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "k_proj", "v_proj",
           "o_proj", "input_linear", "output_linear", "in_proj", "out_proj"], "bias": "none", "use_dora": False}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def _engine(ckpt: Path, streams: int, max_loras: int) -> Engine:
    cfg = EngineConfig(device="cpu", dtype="float32", max_concurrent_seqs=streams, max_input_tokens=256,
                       max_total_tokens=512, kv_cache_tokens=streams * 512, max_step_tokens=2048,
                       prefix_cache=False, max_loras=max_loras, max_lora_rank=RANK)
    eng = Engine(ckpt, cfg, "demo")
    eng.start()
    assert eng.wait_ready(300), eng.error
    return eng


def _load(eng: Engine, streams: int, new: int, adapters: list[str | None], vocab: int) -> tuple[float, int]:
    rng = random.Random(7)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(48, 80))] for _ in range(streams)]
    done = [0] * streams

    def one(i):
        req = GenerationRequest(tuple(prompts[i]), SamplingParams(max_new_tokens=new, ignore_eos=True),
                                adapter=adapters[i % len(adapters)])
        done[i] = len(eng.submit(req).result().token_ids)

    ts = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0, sum(done)


def run(streams: int = 32, new: int = 32, rounds: int = 2) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    ckpt = build_checkpoint(tmp / "demo", preset="demo", seed=0)
    arch = GraniteArch.from_dir(ckpt)
    paths = [write_adapter(tmp / f"a{i}", arch, seed=i) for i in range(4)]
    base = _engine(ckpt, streams, 0)
    lora = _engine(ckpt, streams, 4)
    reg = []
    for i, p in enumerate(paths):
        t0 = time.perf_counter()
        lora.register_adapter(f"a{i}", str(p))
        reg.append(time.perf_counter() - t0)
    names = [f"a{i}" for i in range(4)]
    _load(base, streams, 4, [None], arch.vocab_size)  # warm both (first steps allocate)
    _load(lora, streams, 4, names, arch.vocab_size)
    tps = {"base": [], "lora": []}
    for _ in range(rounds):  # alternated: the machine's load drifts between rounds, not within a pair
        for key, eng, ads in (("base", base, [None]), ("lora", lora, names)):
            s, n = _load(eng, streams, new, ads, arch.vocab_size)
            tps[key].append(n / s)
    shapes = target_shapes(arch)
    info = lora.list_adapters()[0]
    per_adapter_formula = RANK * sum(i + o for i, o in shapes.values()) * 4
    rep = {
        "machine": machine_name(), "load_average_1m": round(os.getloadavg()[0], 2),
        "machine_note": "fp32, demo checkpoint (hidden 256, 8 layers)",
        "streams": streams, "new_tokens": new, "rounds": rounds, "adapters": 4, "rank": RANK,
        "tokens_per_s": {k: [round(v, 1) for v in vs] for k, vs in tps.items()},
        "ratio_lora_over_base": round(sum(tps["lora"]) / sum(tps["base"]), 3),
        "target_ratio": 0.8,
        "registration_s": [round(x, 3) for x in reg],
        "adapter_host_bytes": info["bytes"], "adapter_formula_bytes": per_adapter_formula,
        "device_stack_bytes": lora.runner.adapters.device_bytes,
        "device_stack_formula_bytes": lora_bytes(shapes, 4, RANK, torch.float32),
        "micro_bf16_rank16_adapter_bytes": micro_bytes(),
    }
    base.shutdown(5)
    lora.shutdown(5)
    return rep


def micro_bytes() -> dict:
    """The full-size micro (GRANITE.md): bytes of one rank-16 bf16 adapter on every target, and of 4 device slots."""
    a = GraniteArch(vocab_size=100352, hidden=2048, kinds=tuple("attention" if i in (5, 15, 25, 35) else "mamba"
                                                               for i in range(40)),
                    n_heads=32, n_kv_heads=8, head_dim=64, mlp_inner=8192, rms_eps=1e-5, embedding_multiplier=12.0,
                    residual_multiplier=0.22, attention_multiplier=1 / 64, logits_scaling=8.0, tie_embeddings=True,
                    attention_bias=False, m_heads=64, m_head_dim=64, m_state=128, m_groups=1, m_conv=4, m_chunk=256,
                    m_conv_bias=True, m_proj_bias=False, dt_limit=(0.0, float("inf")))
    shapes = target_shapes(a)
    s = sum(i + o for i, o in shapes.values())
    return {"sum_in_plus_out": s, "adapter_bytes": RANK * s * 2, "stacks_4_slots_bytes": lora_bytes(shapes, 4, RANK,
                                                                                                     torch.bfloat16)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora-cpu.json"))
    a = ap.parse_args(argv)
    rep = run(a.streams, a.new, a.rounds)
    Path(a.out).write_text(json.dumps(rep, indent=1) + "\n")
    print(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
