"""Packed prefill: the chunks of several sequences in ONE network forward, with metadata built once per step.

Dense ops (embedding, norms, projections, MLP, lm_head) run on all T packed tokens at once, (T, hidden).
Ops with per-sequence state run on a padded view (b, L, ...) in which every sequence starts at column 0
and has zeros after its end (L = the longest chunk):
  causal conv   from each slot's conv state; the new state is taken at each sequence's own end
  SSD scan      from each slot's SSM state; pads get dt = 0 (no decay, no input), so the final
                state is the state after the sequence's last real token. The fused kernel instead runs
                the fresh sequences (start == 0: zero state) packed back to back in one varlen call and
                each continued one on its own real tokens (see ScanRows, model/network/kernels.py ssd_prefill)
  attention     each sequence's own KV (start + length keys), causal with the diagonal offset by its start:
                rows that share a start form one AttnGroup, one call over keys [0, start + width) with no
                mask tensor (model/network/prefill_attention.py)
Pad rows are computed and dropped by unpad(); they never reach a real row.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

# Padded key rows (sequences x longest start + length) one packed forward may gather for attention: a long
# context continuing next to short prompts would otherwise make every sequence gather its whole key range.
MAX_PACK_KEY_ROWS = 1 << 16


def pack_runs(extents: list[int], budget: int = MAX_PACK_KEY_ROWS) -> list[range]:
    """Split chunks (extent = start + length each) into consecutive runs with len(run) x max extent <= budget
    (a single chunk always forms a run). Torch-free."""
    runs, first, widest = [], 0, 0
    for i, e in enumerate(extents):
        if i > first and (i - first + 1) * max(widest, e) > budget:
            runs.append(range(first, i))
            first, widest = i, 0
        widest = max(widest, e)
    return runs + [range(first, len(extents))] if extents else runs


def _token_rows(lengths: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """lengths (b,) >= 1, summing to total -> (row of each token, its position in the row), both (total,)."""
    offs = lengths.cumsum(0) - lengths
    row = torch.zeros(total, dtype=torch.long).index_fill_(0, offs[1:], 1).cumsum(0)
    return row, torch.arange(total) - offs.index_select(0, row)


def _attn_groups(starts, lengths, blocks, pad_index, pad_d, unpad_d, block_size, dev) -> tuple[AttnGroup, ...]:
    """The rows by start (host facts, a few index ops per group). One group (every row fresh, or a single
    continued chunk: the common steps) reuses the pack's own pad / unpad indices and blocks."""
    by_start: dict[int, list[int]] = {}
    for i, s in enumerate(starts):
        by_start.setdefault(s, []).append(i)
    offs = [0]
    for n in lengths:
        offs.append(offs[-1] + n)
    groups = []
    for past, rows in by_start.items():
        width = max(lengths[i] for i in rows)
        nb = -(-(past + width) // block_size)
        if len(rows) == 1:
            i = rows[0]
            groups.append(AttnGroup(past, width, dev(blocks[i:i + 1, :nb]), (offs[i], offs[i + 1]), None, None, None))
        elif len(by_start) == 1:
            groups.append(AttnGroup(past, width, dev(blocks[:, :nb]), None, pad_d, unpad_d, None))
        else:
            r, ns = torch.tensor(rows), [lengths[i] for i in rows]
            pad = pad_index.index_select(0, r)[:, :width]  # (n, width)
            k, j = _token_rows(torch.tensor(ns), sum(ns))  # row in the group, position, per token of the group
            unpad = k * width + j
            groups.append(AttnGroup(past, width, dev(blocks.index_select(0, r)[:, :nb]), None, dev(pad), dev(unpad),
                                    dev(pad.reshape(-1).index_select(0, unpad))))
    return tuple(groups)


@dataclass(frozen=True)
class ScanRows:
    """Host facts for the fused SSD scan of one packed forward, so that no layer reads a tensor back.

    The varlen kernel (cu_seqlens / seq_idx) starts every packed sequence from a zero state (its per-sequence
    states ignore initial_states), so only fresh rows go into it; continued rows run one call each.
    """

    lengths: tuple[int, ...]  # tokens per row
    fresh: tuple[int, ...]  # rows that start from a zero state, in row order
    continued: tuple[int, ...]  # rows that continue from their slot's state
    fresh_tokens: torch.Tensor  # (T_f,) long: flat (b * L) padded positions of the fresh rows' tokens
    fresh_packed: torch.Tensor  # (T_f,) long: their packed (T) positions
    fresh_rows: torch.Tensor  # (n_f,) long
    cu_seqlens: torch.Tensor  # (n_f + 1,) int32: token offsets of the fresh rows, back to back
    seq_idx: torch.Tensor  # (1, T_f) int32: fresh row ordinal of each of their tokens


@dataclass(frozen=True)
class AttnGroup:
    """Rows of one packed prefill that share a start (`past`): one causal attention call, query l of a row
    seeing keys [0, past + l]. Rows shorter than the group's width are padded at the end; a pad query only
    ever sees keys past its row's end and its output is dropped, so no mask is needed. Host ints + indices."""

    past: int  # tokens cached before each row's chunk
    width: int  # the group's longest chunk: queries per row, padded
    blocks: torch.Tensor  # (n, nb) long: each row's first nb = ceil((past + width) / block_size) KV blocks
    span: tuple[int, int] | None  # one row: its tokens are packed[span[0]:span[1]] (no index tensors below)
    pad_index: torch.Tensor | None  # (n, width) long: the packed token at each padded position (T: a zero row)
    unpad_index: torch.Tensor | None  # (T_g,) long: each of the group's tokens in the flattened (n * width) view
    packed: torch.Tensor | None  # (T_g,) long: their packed positions; None when the group is the whole pack


@dataclass
class Packed:
    slots: torch.Tensor  # (b,) long: each sequence's slot in the state pool
    lengths: torch.Tensor  # (b,) long: tokens of each chunk
    pad_index: torch.Tensor  # (b, L) long: packed row of each padded position; T (a zero row) at pads
    unpad_index: torch.Tensor  # (T,) long: row of each packed token in the flattened (b * L) view
    kv_write: torch.Tensor  # (T,) long: row of each packed token in the flattened KV cache
    attn: tuple[AttnGroup, ...]  # the rows grouped by start, in order of first appearance
    host_starts: tuple[int, ...] = ()  # the same facts as Python ints (no device read-back in the layers)
    host_lengths: tuple[int, ...] = ()

    @classmethod
    def build(cls, slots, starts, lengths, tables, block_size: int, dummy_block: int, device) -> Packed:
        """slots, starts, lengths: ints per sequence; tables: each sequence's KV block ids (list or tensor).

        The index tensors are computed on the host with a few ops over the T tokens, then copied to the device:
        no per-token Python and no boolean-mask or advanced indexing (index_select instead), each of which
        costs milliseconds at T ~ 5K on a busy 2-core machine.
        """
        b, L, T = len(lengths), max(lengths), sum(lengths)
        nb = -(-max(s + n for s, n in zip(starts, lengths, strict=True)) // block_size)
        rows = [(t.tolist() if isinstance(t, torch.Tensor) else list(t))[:nb] for t in tables]
        blocks = torch.tensor([t + [dummy_block] * (nb - len(t)) for t in rows])  # (b, nb) long, host
        st = torch.tensor(starts)
        row, j = _token_rows(torch.tensor(lengths), T)
        unpad_index = row * L + j
        pad_index = torch.full((b * L,), T).index_copy_(0, unpad_index, torch.arange(T)).view(b, L)
        pos = st.index_select(0, row) + j  # each token's position in its sequence
        kv_write = blocks.view(-1).index_select(0, row * nb + pos // block_size) * block_size + pos % block_size
        long = {"dtype": torch.long, "device": device}
        dev = lambda t: t.to(device)  # noqa: E731
        pad_d, unpad_d = dev(pad_index), dev(unpad_index)
        attn = _attn_groups(starts, lengths, blocks, pad_index, pad_d, unpad_d, block_size, dev)
        return cls(torch.tensor(slots, **long), torch.tensor(lengths, **long), pad_d, unpad_d, dev(kv_write), attn,
                   tuple(starts), tuple(lengths))

    @cached_property
    def scan(self) -> ScanRows:
        """Built on first use (only the fused SSD path needs it), once per forward, from the host lists."""
        ns, L = self.host_lengths, max(self.host_lengths)
        fresh = tuple(i for i, s in enumerate(self.host_starts) if s == 0)  # start 0: the runner zeroed the slot
        n, f = torch.tensor(ns), torch.tensor(fresh, dtype=torch.long)
        nf = n.index_select(0, f)
        k, j = _token_rows(nf, int(sum(ns[i] for i in fresh)))  # fresh row ordinal, position, per fresh token
        flat = f.index_select(0, k) * L + j
        packed = (n.cumsum(0) - n).index_select(0, f).index_select(0, k) + j
        cu = torch.cat([torch.zeros(1, dtype=torch.long), nf.cumsum(0)])
        dev = self.slots.device
        return ScanRows(ns, fresh, tuple(sorted(set(range(len(ns))) - set(fresh))), flat.to(dev), packed.to(dev),
                        f.to(dev), cu.to(dev, torch.int32), k[None].to(dev, torch.int32))

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (b, L, ...), zeros at pads."""
        if self.pad_index.shape[0] == 1:  # one sequence: no pads, a view
            return t[None]
        return torch.cat([t, t.new_zeros(1, *t.shape[1:])])[self.pad_index]

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        """(b, L, ...) -> (T, ...)."""
        return t[0] if t.shape[0] == 1 else t.flatten(0, 1)[self.unpad_index]
