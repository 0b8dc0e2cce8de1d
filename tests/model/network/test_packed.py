"""Packed.build / Packed.scan index tensors against their per-token definitions (plain Python)."""

from __future__ import annotations

import pytest

from model.network.packed import Packed


@pytest.mark.parametrize("starts,lengths", [([0], [5]), ([0, 7, 0, 3], [20, 9, 33, 1]), ([4, 9], [13, 30]),
                                            ([0, 0, 0], [16, 1, 17]), ([5, 0, 5, 5], [2, 9, 7, 1])])
def test_indices_match_per_token_definitions(starts, lengths):
    bs, dummy = 4, 99
    tables = [[10 * i + k for k in range(12)] for i in range(len(lengths))]
    pk = Packed.build(list(range(len(lengths))), starts, lengths, tables, bs, dummy, "cpu")
    L, T = max(lengths), sum(lengths)
    offs = [sum(lengths[:i]) for i in range(len(lengths))]
    pad = [[offs[i] + j if j < n else T for j in range(L)] for i, n in enumerate(lengths)]
    unpad = [i * L + j for i, n in enumerate(lengths) for j in range(n)]
    kv = [tables[i][p // bs] * bs + p % bs
          for i, (s, n) in enumerate(zip(starts, lengths, strict=True)) for p in range(s, s + n)]
    assert pk.pad_index.tolist() == pad and pk.unpad_index.tolist() == unpad and pk.kv_write.tolist() == kv
    # attention: one group per distinct start, in order of first appearance; no (L, Tk) mask anywhere
    assert [g.past for g in pk.attn] == list(dict.fromkeys(starts))
    for g in pk.attn:
        rows = [i for i, s in enumerate(starts) if s == g.past]
        nb = -(-(g.past + g.width) // bs)
        assert g.width == max(lengths[i] for i in rows)
        assert g.blocks.tolist() == [tables[i][:nb] + [dummy] * (nb - len(tables[i][:nb])) for i in rows]
        tokens = [offs[i] + j for i in rows for j in range(lengths[i])]  # the group's packed tokens, in order
        if len(rows) == 1:
            assert g.span == (offs[rows[0]], offs[rows[0]] + lengths[rows[0]]) and g.pad_index is None
            continue
        assert g.pad_index.tolist() == [pad[i][:g.width] for i in rows]
        assert g.unpad_index.tolist() == [k * g.width + j for k, i in enumerate(rows) for j in range(lengths[i])]
        assert (g.packed is None and tokens == list(range(T))) or g.packed.tolist() == tokens
    sc = pk.scan
    fresh = [i for i, s in enumerate(starts) if s == 0]
    assert sc.fresh == tuple(fresh) and sc.continued == tuple(i for i in range(len(lengths)) if i not in fresh)
    assert sc.fresh_tokens.tolist() == [i * L + j for i in fresh for j in range(lengths[i])]
    assert sc.fresh_packed.tolist() == [offs[i] + j for i in fresh for j in range(lengths[i])]
    assert sc.cu_seqlens.tolist() == [sum(lengths[i] for i in fresh[:k]) for k in range(len(fresh) + 1)]
    assert sc.seq_idx.tolist() == [[k for k, i in enumerate(fresh) for _ in range(lengths[i])]]
    assert pk.scan is sc  # once per forward
