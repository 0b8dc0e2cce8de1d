"""Reference ops against naive definitions, and the fused-kernel plumbing against signature-faithful fakes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.network import ssd
from model.network.decode_batch import Decode
from model.network.kernels import Kernels
from tests import fake_kernels
from tests.fake_kernels import fake_ops


def _ssm_inputs(b=2, seqlen=19, h=4, p=3, g=2, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(x=r(b, seqlen, h, p), dt=r(b, seqlen, h), A=-torch.rand(h, generator=gen) * 2,
                B=r(b, seqlen, g, n), C=r(b, seqlen, g, n), D=r(h), dt_bias=r(h) * 0.5,
                initial_states=r(b, h, p, n))


@pytest.mark.parametrize("seqlen,chunk", [(19, 8), (16, 8), (1, 8), (7, 8), (24, 4), (5, 1)])
@pytest.mark.parametrize("limit", [ssd.NO_DT_LIMIT, (0.05, 1.5)])
def test_chunk_scan_equals_recurrence(seqlen, chunk, limit):
    inp = _ssm_inputs(seqlen=seqlen)
    y, final = ssd.ssd_chunk_scan(chunk_size=chunk, dt_limit=limit, **inp)
    y_ref, final_ref = ssd.ssd_naive(dt_limit=limit, **inp)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final, final_ref, atol=1e-4, rtol=1e-4)


def test_chunk_scan_split_sequence_carries_state():
    inp = _ssm_inputs(seqlen=21)
    y, final = ssd.ssd_chunk_scan(chunk_size=8, **inp)
    first = {k: (v[:, :13] if v.dim() >= 3 and k != "initial_states" else v) for k, v in inp.items()}
    y1, s1 = ssd.ssd_chunk_scan(chunk_size=8, **first)
    second = {k: (v[:, 13:] if v.dim() >= 3 and k != "initial_states" else v) for k, v in inp.items()}
    second["initial_states"] = s1
    y2, s2 = ssd.ssd_chunk_scan(chunk_size=8, **second)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2, final, atol=1e-5, rtol=1e-5)


def test_conv_with_state_equals_full_conv():
    gen = torch.Generator().manual_seed(1)
    d, w, seqlen = 6, 4, 11
    x, weight, bias = torch.randn(2, d, seqlen, generator=gen), torch.randn(d, w, generator=gen), torch.randn(d)
    full = F.silu(F.conv1d(x, weight.unsqueeze(1), bias, padding=w - 1, groups=d)[..., :seqlen])
    y1, st = ssd.causal_conv(x[..., :5], None, weight, bias)
    y2, st = ssd.causal_conv(x[..., 5:], st, weight, bias)
    torch.testing.assert_close(torch.cat([y1, y2], -1), full)
    torch.testing.assert_close(st, x[..., -(w - 1):])
    # one token at a time through the pooled in-place update, slots 2 and 0 of a pool of 3
    pool = torch.zeros(3, d, w - 1)
    slots = torch.tensor([2, 0])
    ys = [ssd.conv_decode_inplace(x[..., t], pool, slots, weight, bias) for t in range(seqlen)]
    torch.testing.assert_close(torch.stack(ys, -1), full, atol=1e-6, rtol=1e-6)
    assert float(pool[1].abs().sum()) == 0
    # a slice of consecutive slots (the view path) gives the same outputs and state
    pool2 = torch.zeros(3, d, w - 1)
    ys2 = [ssd.conv_decode_inplace(x[..., t], pool2, slice(1, 3), weight, bias) for t in range(seqlen)]
    torch.testing.assert_close(torch.stack(ys2, -1), full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pool2[1:], pool[slots])


@pytest.mark.parametrize("slots,pool_dtype", [(torch.tensor([3, 1]), torch.float32), (slice(1, 3), torch.float32),
                                              (slice(2, 4), torch.float64)])
def test_ssm_decode_inplace_equals_recurrence(slots, pool_dtype):
    """Indexed slots gather + scatter; a slice of consecutive slots updates the pool through a view
    (or, for a pool that is not fp32, writes back a copy)."""
    inp = _ssm_inputs(seqlen=6)
    y_ref, final_ref = ssd.ssd_naive(**inp)
    pool = torch.zeros(4, *inp["initial_states"].shape[1:], dtype=pool_dtype)
    pool[slots] = inp["initial_states"].to(pool_dtype)
    ys = [ssd.ssm_decode_inplace(pool, slots, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t],
                                 inp["C"][:, t], inp["D"], inp["dt_bias"]) for t in range(6)]
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool[slots].float(), final_ref, atol=1e-5, rtol=1e-5)
    untouched = [i for i in range(4) if i not in range(4)[slots]] if isinstance(slots, slice) else [0, 2]
    assert float(pool[untouched].abs().sum()) == 0


def test_ssm_decode_inplace_over_runs_of_slots_equals_gather(monkeypatch):
    """Big states: rows in runs of consecutive slots are updated through views of the pool, run by run (no
    gather / scatter); outputs and states equal the gathering path's, other slots untouched."""
    inp = _ssm_inputs(seqlen=4)  # two rows
    slots, runs = torch.tensor([1, 4]), ((1, 1), (4, 1))
    init = inp["initial_states"]
    pools = [torch.zeros(6, *init.shape[1:]) for _ in range(2)]
    for pool in pools:
        pool[slots] = init
        pool[[0, 5]] = 7.0
    args = lambda t: (inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t], inp["D"],  # noqa: E731
                      inp["dt_bias"])
    gathered = [ssd.ssm_decode_inplace(pools[0], slots, *args(t)) for t in range(4)]
    calls = []
    monkeypatch.setattr(ssd, "RUNS_MIN_SLOT_BYTES", 0)
    monkeypatch.setattr(torch.Tensor, "index_copy_", lambda *a, **k: calls.append("scatter"))
    viewed = [ssd.ssm_decode_inplace(pools[1], slots, *args(t), runs=runs) for t in range(4)]
    assert calls == []
    torch.testing.assert_close(torch.stack(viewed), torch.stack(gathered), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pools[1], pools[0], atol=1e-6, rtol=1e-6)
    assert bool((pools[1][[0, 5]] == 7).all()) and float(pools[1][[2, 3]].abs().sum()) == 0


def _run_conv_ops(K, dtype=torch.float32):
    """Both conv ops on small random inputs; returns outputs and the mutated pool."""
    gen = torch.Generator().manual_seed(5)
    d, w = 7, 4
    weight, bias = torch.randn(d, w, generator=gen).to(dtype), torch.randn(d, generator=gen).to(dtype)
    xc = torch.randn(2, d, 9, generator=gen).to(dtype)
    st = torch.randn(2, d, w - 1, generator=gen).to(dtype)
    yc, stc = K.conv_prefill(xc, st, weight, bias, torch.tensor([9, 5]))
    cpool = torch.randn(5, d, w - 1, generator=gen).to(dtype)
    yd = K.conv_decode(torch.randn(3, d, generator=gen).to(dtype), cpool, torch.tensor([4, 0, 2]), weight, bias)
    return [yc[0], yc[1, :, :5], stc, cpool, yd]


# The Mamba kernels (SSD scan, selective_state_update) run for real under Triton's interpreter: tests/triton.
# causal-conv1d is CUDA C++ only: its calls are checked against the fakes in tests/fake_kernels.py.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_fused_conv_plumbing_matches_reference(dtype, tol):
    ref = _run_conv_ops(Kernels("reference", "cpu"), dtype)
    fake_kernels.calls.clear()
    K = Kernels("auto", "cpu", fused=fake_ops(mamba_chunk_scan_combined=True, selective_state_update=True))
    assert K.report["conv_prefill"] == "fused:causal_conv1d_fn" and K.report["ssd_prefill"] == "reference"
    got = _run_conv_ops(K, dtype)
    assert set(fake_kernels.calls) == {"causal_conv1d_fn", "causal_conv1d_update"}
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def test_modes_and_errors():
    with pytest.raises(RuntimeError, match="CUDA"):
        Kernels("fused", "cpu")
    with pytest.raises(ValueError):
        Kernels("fast", "cpu")
    with pytest.raises(RuntimeError, match="conv_decode"):
        Kernels("fused", "cpu", fused=fake_ops(causal_conv1d_update=True))
    auto = Kernels("auto", "cpu")
    assert auto.report == {"ssd_prefill": "reference", "ssm_decode": "reference", "conv_prefill": "reference",
                           "conv_decode": "reference", "add_norm": "reference", "gated_norm": "reference",
                           "swiglu": "reference", "attention": "sdpa", "decode_attention": "gather+sdpa",
                           "linear": "onednn:_linear_pointwise", "lora": "cpu:segmented|all_slots"}
    mixed = Kernels("auto", "cpu", fused=fake_ops(causal_conv1d_fn=True))
    assert mixed.report["conv_prefill"] == "reference" and mixed.report["ssd_prefill"].startswith("fused")
    assert Kernels("reference", "cpu", fused=fake_ops()).report["ssm_decode"] == "reference"


@pytest.mark.parametrize("lq", [1, 5])
def test_attention_gqa_equals_repeated_kv(monkeypatch, lq):
    """GQA by grouping query heads per KV head equals SDPA over repeat_interleave'd K/V, also when SDPA
    hands back a transposed layout (as CUDA kernels do)."""
    gen = torch.Generator().manual_seed(3)
    b, hq, hkv, lk, e = 3, 8, 2, 7, 4
    q = torch.randn(b, hq, lq, e, generator=gen)
    k, v = torch.randn(b, hkv, lk, e, generator=gen), torch.randn(b, hkv, lk, e, generator=gen)
    mask = torch.rand(b, 1, lq, lk, generator=gen) < 0.7
    mask[..., 0] = True
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=mask,
                                         scale=0.3)
    torch.testing.assert_close(Kernels.attention(q, k, v, mask, 0.3), ref)
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **kw: sdpa(*a, **kw).transpose(1, 2).contiguous().transpose(1, 2))
    torch.testing.assert_close(Kernels.attention(q, k, v, mask, 0.3), ref)


def test_fakes_keep_upstreams_signatures_checks_and_dtypes():
    """The stand-ins reject what mamba-ssm 2.3.2.post1 / causal-conv1d 1.6.2.post1 reject, so model/network/kernels.py
    is held to the real contract on CPU (not to our assumptions)."""
    import inspect

    gen = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    # SSD scan: no state_dtype argument (so Kernels takes the branch production takes), fp32 final states
    assert "state_dtype" not in inspect.signature(fake_kernels.mamba_chunk_scan_combined).parameters
    K = Kernels("fused", "cpu", fused=fake_ops())
    assert not K.ssd_state_dtype_arg
    bf = torch.bfloat16
    y, final = K.ssd_prefill(r(1, 5, 2, 3).to(bf), r(1, 5, 2).to(bf), -torch.rand(2), r(1, 5, 1, 4).to(bf),
                             r(1, 5, 1, 4).to(bf), 4, torch.ones(2), torch.zeros(2), torch.zeros(1, 2, 3, 4, dtype=bf),
                             ssd.NO_DT_LIMIT)
    assert y.dtype == bf and final.dtype == torch.float32
    # selective_state_update: D=None / dt_bias=None crash the launch; negative indices are padding rows
    h, p, n = 2, 3, 4
    state = r(4, h, p, n)
    args = (r(2, h, p), r(2, h, p), -torch.rand(h, p, n), r(2, 1, n), r(2, 1, n))
    with pytest.raises(TypeError):
        fake_kernels.selective_state_update(state, *args, D=None, dt_bias=r(h, p), state_batch_indices=None)
    with pytest.raises((TypeError, AttributeError)):
        fake_kernels.selective_state_update(state[:2], *args, D=r(h, p), dt_bias=None)
    before = state.clone()
    out = fake_kernels.selective_state_update(state, *args, D=r(h, p), dt_bias=r(h, p),
                                              state_batch_indices=torch.tensor([2, -1], dtype=torch.int32))
    assert bool((out[1] == 0).all()) and torch.equal(state[[0, 1, 3]], before[[0, 1, 3]])
    assert not torch.equal(state[2], before[2])
    # causal-conv1d: bias dtype == weight dtype, int32 indices with stride 1, conv state dtype == input dtype
    d, w = 8, 4
    weight, bias, pool, x = r(d, w), r(d), r(5, d, w - 1), r(3, d)
    idx = torch.tensor([4, 0, 2], dtype=torch.int32)
    with pytest.raises(AssertionError, match="bias dtype"):
        fake_kernels.causal_conv1d_update(x, pool, weight, bias.to(bf), "silu", None, idx)
    with pytest.raises(AssertionError, match="bias dtype"):
        fake_kernels.causal_conv1d_fn(x[None].transpose(1, 2).contiguous(), weight, bias.double(), activation="silu")
    with pytest.raises(AssertionError):
        fake_kernels.causal_conv1d_update(x, pool, weight, bias, "silu", None, torch.arange(6, dtype=torch.int32)[::2])
    with pytest.raises(AssertionError):
        fake_kernels.causal_conv1d_update(x, pool, weight, bias, "silu", None, idx.long())
    with pytest.raises(AssertionError, match="conv_state dtype"):
        fake_kernels.causal_conv1d_update(x.to(bf), pool, weight, bias, "silu", None, idx)
    pool2 = pool.clone()
    out = fake_kernels.causal_conv1d_update(x, pool2, weight, bias, "silu", None,
                                            torch.tensor([4, -1, 2], dtype=torch.int32))
    assert bool((out[1] == 0).all()) and torch.equal(pool2[[0, 1, 3]], pool[[0, 1, 3]])



def test_fused_state_kernels_get_slot_indices_they_can_address(tiny_ckpt):
    """selective_state_update gets int64 slots (it multiplies the index by the slot stride in the index's type:
    tests/triton/test_ssm_decode_interp.py runs slot 4,096 of the micro), causal_conv1d_update int32 (all it
    accepts; 32-bit offsets): a conv pool past those is refused when the model is bound to it."""
    from types import SimpleNamespace

    from model.network.granite import load_granite
    from model.runtime.state import StatePool

    seen = {}

    def ssu(*args, state_batch_indices, **kw):
        seen["ssm"] = state_batch_indices.dtype
        return fake_kernels.selective_state_update(*args, state_batch_indices=state_batch_indices, **kw)

    def conv(*args, conv_state_indices, **kw):
        seen["conv"] = conv_state_indices.dtype
        return fake_kernels.causal_conv1d_update(*args, conv_state_indices=conv_state_indices, **kw)

    ops = fake_ops()
    ops.selective_state_update, ops.causal_conv1d_update = ssu, conv
    K = Kernels("fused", "cpu", fused=ops)
    m = load_granite(tiny_ckpt, "cpu", torch.float32)
    m.bind(StatePool(m.arch, 3, 64, "cpu", torch.float32, torch.float32), K)
    table = torch.zeros(2, 1, dtype=torch.long)
    for slots in (torch.tensor([2, 0]), slice(1, 3)):
        m.decode(Decode(torch.tensor([5, 6]), slots, torch.tensor([0, 0]), table))
        assert seen == {"ssm": torch.int64, "conv": torch.int32}
    # the micro's conv pool (36 layers, S slots, 4352 channels, 3 columns) on the meta device: strides, no memory
    micro = lambda s: SimpleNamespace(conv=torch.empty(36, s, 4352, 3, device="meta"))  # noqa: E731
    K.check_slots(micro(2**32 // (4352 * 3)).conv)  # 328,965 slots: the last one's end is 2^32 - 1 elements in
    with pytest.raises(RuntimeError, match="328966 conv state slots .* exceed the 32-bit offsets"):
        m.bind(micro(2**32 // (4352 * 3) + 1), K)
    Kernels("reference", "cpu").check_slots(micro(10**6).conv)  # the torch reference indexes in int64
