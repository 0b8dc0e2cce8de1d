"""bench/forks.py on the tiny checkpoint: the forked mode computes the prompt once, answers the same as separate
requests with seed + i, and leaves every KV block free."""

from __future__ import annotations

from bench.forks import run_forks


def test_forks_vs_separate(tiny_ckpt):
    r = run_forks(tiny_ckpt, rounds=2, prompt_tokens=60, gen=4, n=4, max_input_tokens=200, max_total_tokens=256,
                  kv_cache_tokens=4096)
    assert r["outputs_identical"] and r["kv_blocks_free_after"]
    assert r["forked"]["prefill_tokens"] == 2 * (60 - 1 + 4)  # per round: the prompt once, each row its last token
    assert r["separate"]["prefill_tokens"] == 2 * 4 * 60
    assert r["forked"]["generated"] == r["separate"]["generated"] == 2 * 4 * 4
