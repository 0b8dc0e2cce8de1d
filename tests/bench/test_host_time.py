"""bench/host_time.py on the tiny checkpoint: the figures `make bench` reports exist and mean what they say."""

from __future__ import annotations

from bench import host_time


def test_syncs_per_step_counts_the_one_read_of_a_decode_step(tiny_ckpt):
    s = host_time.syncs_per_step(tiny_ckpt)
    assert s["prefill_forward"] == 0, s["prefill_kinds"]
    assert s["decode_step"] == 1 and s["decode_kinds"] == {"tolist": 1}  # the sampled tokens, nothing else


def test_host_step_times_are_positive_and_stubbed(tiny_ckpt):
    d = host_time.host_decode_ms(tiny_ckpt, 4, 256, steps=3, warmup=1)
    p = host_time.host_prefill_ms(tiny_ckpt, n=4, lo=16, hi=64, steps=3, warmup=1)
    for r in (d, p):
        assert 0 < r["min"] <= r["p50"]
