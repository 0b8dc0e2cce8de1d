"""Memory and time of one prefill chunk at growing context, on CPU (the attention's L x Tk question).

    python -m bench.prefill_memory [--json] [--against DIR]

One chunk of L tokens continuing at past = Tk - L (queries [past, Tk) over keys [0, Tk)) through the network's
own prefill (GraniteForCausalLM.prefill), measured with torch's profiler (profile_memory): the peak of live
bytes allocated during the call over those live before it, and the largest single allocation. A mask of the
chunk's (L, Tk) shape is L * Tk bytes as bool (x rep x 4 as the float copy SDPA makes of it): the old path's
peak grew with L * Tk, this one's with L + Tk.
--against DIR also measures the checkout at DIR (e.g. `git archive main | tar -x -C DIR`) in subprocesses,
alternating with this one, and reports the time ratios of the same chunk (2-core VM: compare medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from model.network.arch import GraniteArch

# hidden 2048 with 32 query / 8 KV heads of 64 (the micro's attention), one Mamba and one attention layer
WIDE = dict(hidden_size=2048, num_hidden_layers=2, attention_layers=(1,), num_attention_heads=32,
            num_key_value_heads=8, mamba_n_heads=64, mamba_d_head=64, mamba_d_state=128, mamba_chunk_size=256,
            max_position_embeddings=131072)
GRID = ((512, 512), (512, 4096), (512, 16384))  # (L, Tk): fresh, then continued at growing context
# The micro's attention alone (32 query / 8 KV heads of 64) for measuring one prefill attention call; the
# Mamba fields only matter to other budget terms.
MICRO_ATTN = GraniteArch(vocab_size=512, hidden=2048, kinds=("attention",), n_heads=32, n_kv_heads=8, head_dim=64,
                         mlp_inner=64, rms_eps=1e-6, embedding_multiplier=1.0, residual_multiplier=1.0,
                         attention_multiplier=1 / 64, logits_scaling=1.0, tie_embeddings=True, attention_bias=False,
                         m_heads=1, m_head_dim=1, m_state=1, m_groups=1, m_conv=4, m_chunk=16, m_conv_bias=True,
                         m_proj_bias=False, dt_limit=(0.0, float("inf")))


def alloc_profile(fn) -> tuple[int, int]:
    """(peak live bytes over the start, largest single allocation) of the CPU allocations fn() makes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = largest = 0
    for _, n in events:
        live += n
        peak, largest = max(peak, live), max(largest, n)
    return peak, largest


def attention_case(starts, lengths, device="cpu", dtype=torch.float32, block_size: int = 16, seed: int = 0):
    """One packed prefill attention call at MICRO_ATTN's heads: a random KV pool holding each sequence's blocks
    back to back, packed q, the Packed. Returns (q, k_cache, v_cache, pk, longest start + length)."""
    from model.network.packed import Packed

    a = MICRO_ATTN
    tk = max(s + n for s, n in zip(starts, lengths, strict=True))
    nb = -(-tk // block_size)
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(len(starts) * nb + 1, block_size, a.n_kv_heads, a.head_dim, generator=gen)
    v_cache = torch.randn(k_cache.shape, generator=gen)
    q = torch.randn(sum(lengths), a.n_heads, a.head_dim, generator=gen)
    tables = [list(range(i * nb, (i + 1) * nb)) for i in range(len(starts))]
    pk = Packed.build(list(range(len(starts))), starts, lengths, tables, block_size, len(starts) * nb, device)
    to = lambda t: t.to(device, dtype)  # noqa: E731
    return to(q), to(k_cache), to(v_cache), pk, tk


def load(ckpt: Path, kv_tokens: int):
    """The checkpoint on CPU in fp32 with a one-slot pool of kv_tokens and the CPU kernels."""
    from model.network.granite import load_granite
    from model.network.kernels import Kernels
    from model.runtime.state import StatePool

    model = load_granite(ckpt, "cpu", torch.float32)
    pool = StatePool(model.arch, 1, kv_tokens, "cpu", torch.float32, torch.float32)
    model.bind(pool, Kernels("auto", "cpu"))
    return model, pool


def chunk(model, pool, L: int, tk: int):
    """One prefill chunk of L tokens at past = tk - L in slot 0 (the pool's KV and state as they are)."""
    ids = torch.arange(L) % (model.arch.vocab_size - 1) + 1
    table = list(range(-(-tk // pool.block_size)))
    return lambda: model.prefill(ids, 0, tk - L, table)


def attention_layer(model, pool, L: int, tk: int):
    """The chunk's first attention layer alone (its Attention.prefill: projections, KV write, attention)."""
    from model.network.packed import Packed

    i = model.arch.kinds.index("attention")
    layer, j = model.model.layers[i].self_attn, model.model.layers[i].kind_index
    h = torch.randn(L, model.arch.hidden, generator=torch.Generator().manual_seed(0))
    pk = Packed.build([0], [tk - L], [L], [list(range(-(-tk // pool.block_size)))], pool.block_size,
                      pool.dummy_block, "cpu")
    return lambda: layer.prefill(h, pk, pool.k[j], pool.v[j], model.K)


def _median_ms(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return round(statistics.median(ts) * 1e3, 1)


def measure(ckpt: Path, grid=GRID, repeats: int = 0) -> list[dict]:
    """Per (L, Tk): the chunk's peak / largest allocation, its attention layer's peak; with repeats, the
    median ms of the chunk and of its attention layer."""
    model, pool = load(ckpt, max(tk for _, tk in grid))
    rows = []
    for L, tk in grid:
        fn, attn = chunk(model, pool, L, tk), attention_layer(model, pool, L, tk)
        fn()  # warm
        attn()
        peak, largest = alloc_profile(fn)
        row = {"L": L, "Tk": tk, "peak_mib": round(peak / 2**20, 2), "largest_mib": round(largest / 2**20, 2),
               "attn_peak_mib": round(alloc_profile(attn)[0] / 2**20, 2)}
        if repeats:
            row["ms"], row["attn_ms"] = _median_ms(fn, repeats), _median_ms(attn, 2 * repeats)
        rows.append(row)
    return rows


def _child(src: str, ckpt: str, repeats: int) -> list[dict]:
    """measure() in a subprocess whose `model` package is the one at src (this file's measure(), which only
    uses GraniteForCausalLM.prefill, so a checkout without this file can be measured too)."""
    code = ("import importlib.util, json, sys; from pathlib import Path; "
            f"sys.path.insert(0, {src!r}); "
            f"spec = importlib.util.spec_from_file_location('prefill_memory', {__file__!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            f"print(json.dumps(m.measure(Path({ckpt!r}), repeats={repeats})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.splitlines()[-1])


def compare(ckpt: Path, other: Path, rounds: int = 3, repeats: int = 3) -> dict:
    """Alternate this checkout and `other`, `rounds` subprocesses each; medians of their per-round medians."""
    here = str(Path(__file__).resolve().parents[1])
    runs = {"this": [], "other": []}
    for _ in range(rounds):
        runs["this"].append(_child(here, str(ckpt), repeats))
        runs["other"].append(_child(str(other), str(ckpt), repeats))
    out = []
    for i, (L, tk) in enumerate(GRID):
        row = {"L": L, "Tk": tk}
        for key in ("ms", "attn_ms"):
            med = {k: statistics.median(r[i][key] for r in v) for k, v in runs.items()}
            row |= {f"this_{key}": med["this"], f"other_{key}": med["other"],
                    f"other_over_this_{key}": round(med["other"] / med["this"], 2)}
        for key in ("peak_mib", "attn_peak_mib"):
            row |= {f"this_{key}": runs["this"][0][i][key], f"other_{key}": runs["other"][0][i][key]}
        out.append(row)
    return {"rounds": rounds, "repeats": repeats, "rows": out}


def report(out_dir: Path) -> dict:
    """`make bench`'s prefill_memory section: the WIDE checkpoint built in out_dir, measured here."""
    from model.checkpoint.demo import build_checkpoint

    ckpt = build_checkpoint(out_dir, preset="tiny", **WIDE)
    return {"checkpoint": {k: list(v) if isinstance(v, tuple) else v for k, v in WIDE.items()},
            "rows": measure(ckpt, repeats=3)}


def main(argv: list[str] | None = None) -> int:
    from model.checkpoint.demo import build_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", type=Path, help="another checkout to time against (alternating)")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if not a.against:
            res = report(Path(tmp) / "wide")
        else:
            ckpt = build_checkpoint(Path(tmp) / "wide", preset="tiny", **WIDE)
            res = {"checkpoint": {k: list(v) if isinstance(v, tuple) else v for k, v in WIDE.items()},
                   "compare": compare(ckpt, a.against, a.rounds)}
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
