"""bench/gpu_bench.py smoke-run on CPU with a tiny config (the GPU run uses the same code paths)."""

from __future__ import annotations

import json

import torch

from bench import gpu_bench
from tests.tiny_granite import tiny_config


def test_peak_bandwidth_table():
    assert gpu_bench.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert gpu_bench.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert gpu_bench.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert gpu_bench.peak_bandwidth("NVIDIA A10G") == 0.6e12
    assert gpu_bench.peak_bandwidth("Some Future GPU") is None


def test_random_full_size_init_is_finite_and_typed(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_config().to_dict()))
    m = gpu_bench.build_full_size("cpu", torch.bfloat16, config=cfg)
    for name, p in m.named_parameters():
        assert p.device.type == "cpu" and bool(torch.isfinite(p).all()), name
        want = torch.float32 if name.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias") else torch.bfloat16
        assert p.dtype == want, name


def test_smoke_run_cpu(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_config().to_dict()))
    out = tmp_path / "r.json"
    rc = gpu_bench.main(["--out", str(out), "--device", "cpu", "--config", str(cfg), "--steps", "6",
                         "--prompt", "10", "--max-batch", "4"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert [s["batch"] for s in r["concurrency_sweep"]] == [1, 2, 4]
    assert r["engine"]["static"]["batch1"]["tokens_per_s"] > 0
    assert r["memory"]["state_bytes_per_seq"] > 0 and r["weight_bytes"] > 0
    # fp32 on CPU: the engine and HF generate on the shared weights agree token for token
    assert "error" not in r["hf_generate"], r["hf_generate"]
    assert r["greedy_same_prefix_vs_hf"] == 6
