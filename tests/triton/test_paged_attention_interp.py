"""model/network/paged_attention.py under the interpreter against SDPA on the gathered KV (Kernels' reference
decode_attention), and the proof that it reads only each row's live tokens: everything else in the cache
is NaN, which any read would spread into the output."""

from __future__ import annotations

import pytest
import torch

from model.network import paged_attention as pa
from model.network.fused_ops import FusedOps
from model.network.kernels import Kernels
from model.network.step_meta import DecodeMeta

BS = 16  # model/runtime/state.py BLOCK_SIZE


def _case(gen, lengths, width, hq=8, hkv=2, e=16, dtype=torch.float32, extra_blocks=3):
    """A cache whose live rows are random and every other position NaN; shuffled, interleaved tables padded
    with the dummy block (the last one) past each row's blocks, as static decode pads them."""
    nb = sum(-(-n // BS) for n in lengths) + extra_blocks
    dummy = nb
    k = torch.full((nb + 1, BS, hkv, e), float("nan"), dtype=dtype)
    v = torch.full_like(k, float("nan"))
    perm = torch.randperm(nb, generator=gen).tolist()
    tables, used = [], 0
    for n in lengths:
        blocks = perm[used:used + -(-n // BS)]
        used += len(blocks)
        for j, blk in enumerate(blocks):
            live = min(BS, n - j * BS)
            k[blk, :live] = torch.randn(live, hkv, e, generator=gen).to(dtype)
            v[blk, :live] = torch.randn(live, hkv, e, generator=gen).to(dtype)
        tables.append(blocks + [dummy] * (width - len(blocks)))
    q = torch.randn(len(lengths), hq, e, generator=gen).to(dtype)
    positions = torch.tensor([n - 1 for n in lengths])
    return q, k, v, torch.tensor(tables), positions


def _reference(q, k, v, tables, positions, scale):
    """SDPA on the gathered KV with NaN (never-written) positions zeroed: SDPA's masked lanes would still
    turn NaN into NaN (0 * NaN), the kernel must not even load them."""
    return Kernels("reference", "cpu").decode_attention(q, k.nan_to_num(), v.nan_to_num(),
                                                        DecodeMeta(None, tables, positions, None), scale)


@pytest.mark.parametrize("lengths,width,partition,block_n", [
    ([1], 1, 512, 32),  # one token: the new one only
    ([5, 16, 17, 40], 3, 512, 32),  # partial last blocks, a full block, one split
    ([70, 33, 1, 64], 5, 32, 16),  # several splits; rows that end inside / exactly at a split; short rows
    ([130, 3], 12, 64, 32),  # table much wider than the rows (static decode's width bucket): idle splits
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paged_matches_sdpa_on_gathered_kv(lengths, width, partition, block_n, dtype):
    gen = torch.Generator().manual_seed(len(lengths) * 7 + width)
    q, k, v, tables, positions = _case(gen, lengths, width, dtype=dtype)
    out = pa.paged_decode_attention(q, k, v, tables, positions, 0.125, partition=partition, block_n=block_n)
    assert out.shape == q.shape and out.dtype == dtype
    assert not out.isnan().any()
    ref = _reference(q.float(), k.float(), v.float(), tables, positions, 0.125)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out.float(), ref, **tol)


def test_gqa_heads_and_dummy_rows_through_kernels(mamba_ops):
    """Through Kernels.decode_attention with the model's shape: 32 query heads on 8 KV heads, head dim 64;
    padded rows of static decode (dummy block, position 0) read just the dummy block's first row."""
    gen = torch.Generator().manual_seed(11)
    q, k, v, tables, positions = _case(gen, [20, 3], 2, hq=32, hkv=8, e=64)
    dummy = k.shape[0] - 1
    k[dummy, 0], v[dummy, 0] = torch.randn(8, 64, generator=gen), torch.randn(8, 64, generator=gen)
    q = torch.cat([q, torch.randn(2, 32, 64, generator=gen)])
    tables = torch.cat([tables, torch.full((2, 2), dummy)])
    positions = torch.cat([positions, torch.zeros(2, dtype=torch.long)])
    K = Kernels("auto", "cpu", fused=FusedOps(paged_decode_attention=mamba_ops.paged_decode_attention))
    assert K.report["decode_attention"] == "fused:paged_decode_attention"
    meta = DecodeMeta(None, tables, positions, None)
    out = K.decode_attention(q, k, v, meta, 1 / 64)
    torch.testing.assert_close(out, _reference(q, k, v, tables, positions, 1 / 64), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2:], v[dummy, 0].repeat_interleave(4, 0).expand(2, -1, -1))  # 1 key: its value


def test_bad_shapes_are_refused():
    q = torch.zeros(1, 6, 8)
    k = torch.zeros(2, BS, 4, 8)
    with pytest.raises(ValueError, match="multiple"):
        pa.paged_decode_attention(q, k, k, torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                                  1.0)


def test_kv_bytes_accounting():
    """Paged: the ideal KV plus small per-program traffic; gather: 3 passes over the widest row's blocks."""
    kw = dict(kv_heads=8, head_dim=64, elem_bytes=2, block_size=BS, layers=4)
    lengths = [16384] * 64
    ideal = pa.kv_bytes_ideal(lengths, **kw)
    assert ideal == 64 * 16384 * 8 * 1024  # 8 KiB per token (GRANITE.md)
    paged = pa.kv_bytes_paged(lengths, q_heads=32, **kw)
    assert ideal < paged <= 1.05 * ideal
    assert 3 * ideal < pa.kv_bytes_gather(lengths, q_heads=32, **kw) < 3.01 * ideal
    ragged = [16384] + [100] * 63  # the gather pays the longest row's width for every row; paged does not
    assert pa.kv_bytes_paged(ragged, q_heads=32, **kw) < 1.1 * pa.kv_bytes_ideal(ragged, **kw)
    assert pa.kv_bytes_gather(ragged, q_heads=32, **kw) > 100 * pa.kv_bytes_ideal(ragged, **kw)


def test_kernel_reads_each_live_kv_row_once(monkeypatch):
    """Every element address the kernel loads from K / V tiles, recorded in the interpreter: exactly the
    live rows' elements, none twice, whatever the table width or split layout (the basis of kv_bytes_paged)."""
    import numpy as np
    from triton.runtime import interpreter as ti

    block_n, seen = 16, []
    orig = ti.InterpreterBuilder.create_masked_load

    def spy(self, ptrs, mask, other, *a, **k):
        if ptrs.data.ndim == 2 and ptrs.data.shape[0] == block_n:  # (BLOCK_N, E_P) K or V tiles
            seen.append(ptrs.data[mask.data])
        return orig(self, ptrs, mask, other, *a, **k)

    monkeypatch.setattr(ti.InterpreterBuilder, "create_masked_load", spy)
    gen = torch.Generator().manual_seed(5)
    lengths, hkv, e = [70, 33, 1, 64], 2, 16
    q, k, v, tables, positions = _case(gen, lengths, 12, hq=8, hkv=hkv, e=e)
    out = pa.paged_decode_attention(q, k, v, tables, positions, 0.125, partition=32, block_n=block_n)
    assert not out.isnan().any()
    addrs = np.concatenate(seen)
    assert len(addrs) == len(np.unique(addrs)) == sum(lengths) * hkv * e * 2
    assert len(addrs) * 4 == pa.kv_bytes_ideal(lengths, kv_heads=hkv, head_dim=e, elem_bytes=4, block_size=BS,
                                               layers=1)
