"""The mid checkpoint (hidden 1024, 12 layers, ~230M parameters, fp32) through HTTP (issue 11, items 6 and 7).

    python -m bench.mid [--requests 64]

Closed loop, as the peer comparison (shared/peers/llamacpp/load.py) runs it: `c` clients, each streaming its
next prompt (20-60 words) as soon as its last one ended, 64 new tokens each, so at 32 streams new prompts
arrive throughout while the others decode. Reported per level: aggregate tokens/s, TTFT and TPOT p50 / p99
(gaps between a stream's token events at the client). The 32-stream level runs twice in the same run: with
prefill bounded by tokens only (PREFILL_TIME_SHARE=0, the default) and with the time bound at BOUNDED_SHARE, so
the ratio TPOT p99 / p50, the TTFT and the tokens/s of the two are comparable.
Needs ~1 GB for the checkpoint and ~4 min on the 2-core VM.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.http_load import Server, prompts, run_concurrency, stream_one

MID = dict(hidden_size=1024, num_hidden_layers=12, attention_layers=(3, 9), num_attention_heads=16,
           num_key_value_heads=4, mamba_n_heads=32, mamba_d_head=64, mamba_d_state=128)
TARGETS = {"tpot_p99_over_p50_at_32": 3.0, "ttft_p50_at_32": "not worse than the token-bounded default",
           "tok_s_at_8": "not behind llama.cpp (bench/results/peer-llamacpp.json, measured by hand)",
           "tpot_p50_ms_at_1": "issue 11 asks 2.0 ms on the demo checkpoint; see throughput.1 in the report"}
PEER = Path(__file__).resolve().parent / "results" / "peer-llamacpp.json"
BOUNDED_SHARE = 2.0  # a step with prefill takes at most ~3x a decode-only step: the TPOT p99 <= 3x p50 target


def _level(url: str, texts: list[str], conc: int, max_new: int) -> dict:
    r = run_concurrency(url, texts, conc, max_new)
    r["tpot_p99_over_p50"] = r["tpot_p99_ms"] / r["tpot_p50_ms"]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}


def run_mid(ckpt: Path, requests: int = 64, max_new: int = 64) -> dict:
    from model.types import EngineConfig

    texts = prompts(max(requests, 16), seed=1)
    out: dict = {"checkpoint": {k: list(v) if isinstance(v, tuple) else v for k, v in MID.items()},
                 "max_new_tokens": max_new, "targets": TARGETS,
                 "prefill_time_share_default": EngineConfig().prefill_time_share, "bounded_share": BOUNDED_SHARE}
    for label, share in (("token_bounded", 0.0), ("time_bounded", BOUNDED_SHARE)):
        server = Server(ckpt, slots=32, env={"PREFILL_TIME_SHARE": str(share)})
        try:
            stream_one(server.url, texts[0], 4)  # warm-up
            if label == "token_bounded":
                out["1"] = _level(server.url, texts[:4], 1, max_new)
                out["8"] = _level(server.url, texts[:16], 8, max_new)
            out[f"32_{label}"] = _level(server.url, texts[:requests], 32, max_new)
        finally:
            server.stop()
    base, bounded = out["32_token_bounded"], out["32_time_bounded"]
    out["time_bounded_vs_token_bounded"] = {k: round(bounded[k] / base[k], 3) for k in
                                            ("engine_tok_s", "ttft_p50_ms", "tpot_p50_ms", "tpot_p99_ms")}
    out["meets_tpot_p99_target"] = {label: out[f"32_{label}"]["tpot_p99_over_p50"] <= TARGETS["tpot_p99_over_p50_at_32"]
                                    for label in ("token_bounded", "time_bounded")}
    if PEER.exists():
        out["peer_llamacpp"] = json.loads(PEER.read_text()).get("mid")
    return out


def main(argv: list[str] | None = None) -> int:
    from model.checkpoint.demo import build_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run_mid(build_checkpoint(Path(tmp) / "mid", **MID), a.requests), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
