"""bench/multiturn.py on the tiny checkpoint: reuse on computes only the new tokens, same answers."""

from __future__ import annotations

from bench.multiturn import run_multiturn


def test_multiturn_reuse_on_vs_off(tiny_ckpt):
    r = run_multiturn(tiny_ckpt, conversations=2, turns=3, new_tokens=40, gen=4, max_step_tokens=64,
                      prefill_chunk_tokens=32)
    assert r["outputs_identical"]
    off, on = r["reuse_off"]["per_turn"], r["reuse_on"]["per_turn"]
    assert [t["prompt_tokens"] for t in off] == [t["prompt_tokens"] for t in on]
    assert off[0]["prefill_tokens_computed"] == on[0]["prefill_tokens_computed"] == off[0]["prompt_tokens"]
    for t_off, t_on in zip(off[1:], on[1:], strict=True):
        assert t_off["cached_tokens"] == 0 and t_off["prefill_tokens_computed"] == t_off["prompt_tokens"]
        # each later turn resumes from the previous answer's snapshot: all but the new tokens + last answer token
        assert t_on["prefill_tokens_computed"] == t_on["prompt_tokens"] - t_on["cached_tokens"]
        assert t_on["prefill_tokens_computed"] <= 2 * (40 + 20 + 1)
    assert r["turn3_prefill_reduction"] > 0.4 and r["reuse_on"]["prefix_cache"]["hits"] == 4
