"""Torch-free slot + KV-block allocator for the state pool.

A sequence owns one slot (its Mamba conv + SSM state) and a list of KV blocks of `block_size`
tokens for the attention layers. Blocks are reserved up front for the sequence's whole budget
(prompt + max_new_tokens): the scheduler never preempts, so a step can never run out of KV.
"""

from __future__ import annotations


def blocks_needed(n_tokens: int, block_size: int) -> int:
    return -(-max(n_tokens, 0) // block_size)


class SlotAllocator:
    def __init__(self, num_slots: int, num_blocks: int, block_size: int) -> None:
        if num_slots < 1 or num_blocks < 1 or block_size < 1:
            raise ValueError(f"bad allocator sizes: slots={num_slots} blocks={num_blocks} block={block_size}")
        self.num_slots = num_slots
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Low ids first: pop() from the end of a reversed list.
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._free_blocks = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[int, list[int]] = {}

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def max_tokens_per_seq(self) -> int:
        return self.num_blocks * self.block_size

    def can_allocate(self, n_tokens: int) -> bool:
        return bool(self._free_slots) and blocks_needed(n_tokens, self.block_size) <= len(self._free_blocks)

    def allocate(self, n_tokens: int) -> int:
        """Reserve a slot and ceil(n_tokens / block_size) KV blocks; returns the slot id."""
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
        need = blocks_needed(n_tokens, self.block_size)
        if not self._free_slots:
            raise RuntimeError("no free slot")
        if need > len(self._free_blocks):
            raise RuntimeError(f"need {need} KV blocks, {len(self._free_blocks)} free")
        slot = self._free_slots.pop()
        self._tables[slot] = [self._free_blocks.pop() for _ in range(need)]
        return slot

    def block_table(self, slot: int) -> list[int]:
        if slot not in self._tables:
            raise KeyError(f"slot {slot} is not allocated")
        return self._tables[slot]

    def capacity(self, slot: int) -> int:
        return len(self.block_table(slot)) * self.block_size

    def is_allocated(self, slot: int) -> bool:
        return slot in self._tables

    def free(self, slot: int) -> None:
        if slot not in self._tables:
            raise KeyError(f"slot {slot} is not allocated (double free or unknown slot)")
        blocks = self._tables.pop(slot)
        self._free_blocks.extend(reversed(blocks))
        self._free_slots.append(slot)
