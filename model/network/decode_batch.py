"""Decode-step metadata (Decode, the decode counterpart of model/network/packed.py's Packed) and the block tables
kept on the device.

Every slot's KV blocks are reserved up front for its whole budget (model/runtime/blocks.py), so a slot's block table
never changes while its sequence lives: BlockTables uploads it once, the first step after the slot is
(re)allocated, into a (slots + 1, max_blocks) device table, and a decode step only gathers its rows' first
`width` entries there (one index op) instead of building the tables in Python every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Decode:
    ids: torch.Tensor  # (B,) long: the token each row feeds
    slots: torch.Tensor | slice  # (B,) long, or a slice when the rows are consecutive slots (views, no gather)
    positions: torch.Tensor  # (B,) long: tokens already cached per row (= where the new token's KV goes)
    block_tables: torch.Tensor  # (B, width) long: each row's first `width` KV blocks, dummy past its table
    runs: tuple[tuple[int, int], ...] = ()  # (first slot, count) of each run of consecutive slots, host ints


class BlockTables:
    def __init__(self, allocator, num_slots: int, max_blocks: int, dummy_block: int, device) -> None:
        self.allocator, self.dummy_block, self.device = allocator, dummy_block, torch.device(device)
        # row num_slots is the dummy slot: all dummy blocks
        self.table = torch.full((num_slots + 1, max_blocks), dummy_block, dtype=torch.long, device=self.device)
        self._uploaded: list[list[int] | None] = [None] * num_slots  # the allocator's list each row holds

    def sync(self, slots: list[int]) -> list[list[int]]:
        """Upload the tables of newly (re)allocated slots; returns each slot's table (host list)."""
        out = []
        for s in slots:
            t = self.allocator.block_table(s)
            if self._uploaded[s] is not t:  # the allocator makes a new list per allocation
                n = min(len(t), self.table.shape[1])
                self.table[s, :n] = torch.tensor(t[:n], dtype=torch.long).to(self.device, non_blocking=True)
                self.table[s, n:] = self.dummy_block
                self._uploaded[s] = t
            out.append(t)
        return out

    def rows(self, slots: torch.Tensor | slice, width: int) -> torch.Tensor:
        """(B, width) block tables of the given slots (device)."""
        return self.table[slots, :width]
