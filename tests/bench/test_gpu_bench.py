"""bench/gpu_bench.py smoke-run on CPU with a tiny config (the GPU run uses the same code paths)."""

from __future__ import annotations

import json

import pytest
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
    # prompt 40 + steps: the sweep reaches block-table widths 4 (the old warmup prepared width 1 only)
    rc = gpu_bench.main(["--out", str(out), "--device", "cpu", "--config", str(cfg), "--steps", "6",
                         "--prompt", "40", "--max-batch", "4"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert [s["batch"] for s in r["concurrency_sweep"]] == [1, 2, 4]
    # every decode bucket prepared in warmup; no timed step had to prepare (capture) one
    graphs = r["engine"]["static"]["decode_graphs"]
    assert graphs["prepared"] == graphs["keys"] == 3 * 4 and r["timed_uncaptured_steps"] == 0
    assert r["kernels"]["ssd_prefill"] == "reference" and r["claimed_path"]["conv_decode"] == "reference"
    hf = r["hf_generate"]  # the baseline's rate leaves its prefill (and first token) out, as the engine's
    assert 0 < hf["prefill_and_first_token_s"] and hf["new_tokens"] == 6
    assert hf["tokens_per_s"] == pytest.approx(5 / (hf["seconds"] - hf["prefill_and_first_token_s"]))
    assert r["engine"]["static"]["batch1"]["tokens_per_s"] > 0
    assert r["memory"]["state_bytes_per_seq"] > 0 and r["weight_bytes"] > 0
    # fp32 on CPU: the engine and HF generate on the shared weights agree token for token
    assert "error" not in r["hf_generate"], r["hf_generate"]
    assert r["greedy_same_prefix_vs_hf"] == 6


def test_gh200_is_not_an_h200():
    assert gpu_bench.peak_bandwidth("NVIDIA GH200 480GB") == 4.0e12
    assert gpu_bench.peak_bandwidth("NVIDIA H200 NVL") == 4.8e12


def test_claimed_path_is_checked_per_op():
    fused = {"ssd_prefill": "fused:mamba_chunk_scan_combined", "ssm_decode": "fused:selective_state_update",
             "conv_prefill": "fused:causal_conv1d_fn", "conv_decode": "fused:causal_conv1d_update", "attention": "sdpa"}
    assert gpu_bench.path_mismatches(fused, gpu_bench.claimed_path("fused", "fused")) == []
    torch_conv = {**fused, "conv_prefill": "reference", "conv_decode": "reference"}
    assert gpu_bench.path_mismatches(torch_conv, gpu_bench.claimed_path("fused", "torch")) == []
    assert gpu_bench.path_mismatches(torch_conv, gpu_bench.claimed_path("fused", "fused")) == [
        "conv_prefill: claimed fused, ran reference", "conv_decode: claimed fused, ran reference"]
    every_ref = {op: "reference" for op in fused}
    assert len(gpu_bench.path_mismatches(every_ref, gpu_bench.claimed_path("fused", "torch"))) == 2


def test_refuses_numbers_for_another_path(tmp_path):
    """Claiming the fused path on a machine without the kernels: exit 3, an error and the real per-op
    kernels in the report, no rates (it used to measure the reference path silently)."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_config().to_dict()))
    out = tmp_path / "r.json"
    rc = gpu_bench.main(["--out", str(out), "--device", "cpu", "--config", str(cfg), "--kernels", "fused",
                         "--conv", "torch", "--no-hf"])
    assert rc == 3
    r = json.loads(out.read_text())
    assert "claimed fused, ran reference" in r["error"] and r["kernels"]["ssd_prefill"] == "reference"
    assert "engine" not in r and "concurrency_sweep" not in r
