"""Torch-free slot + KV-block allocator for the state pool.

A sequence owns one slot (its Mamba conv + SSM state) and a list of KV blocks of `block_size`
tokens for the attention layers. Blocks are reserved up front for the sequence's whole budget
(prompt + max_new_tokens): the scheduler never preempts, so a step can never run out of KV.

Blocks are reference-counted: a prefix-cache snapshot (model/engine/prefix_cache.py) holds the blocks of the
tokens it covers, and a sequence resumed from it starts its table with the snapshot's *full* blocks,
shared (never written: the sequence only writes positions past the snapshot). A block returns to the
free list when its last holder lets go.
"""

from __future__ import annotations

from collections.abc import Iterable


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
        self._refs: dict[int, int] = {}  # block -> holders (tables + snapshots); a free block is absent

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def max_tokens_per_seq(self) -> int:
        return self.num_blocks * self.block_size

    def can_allocate(self, n_tokens: int, shared: int = 0) -> bool:
        """`shared`: how many of the needed blocks come shared from a snapshot (not taken from the free list)."""
        need = blocks_needed(n_tokens, self.block_size) - shared
        return bool(self._free_slots) and need <= len(self._free_blocks)

    def allocate(self, n_tokens: int, shared: Iterable[int] = ()) -> int:
        """Reserve a slot and ceil(n_tokens / block_size) KV blocks, the first ones being `shared` (held
        blocks, referenced once more), the rest fresh; returns the slot id."""
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
        shared = list(shared)
        need = blocks_needed(n_tokens, self.block_size) - len(shared)
        if need < 0:
            raise ValueError(f"{len(shared)} shared blocks exceed the {n_tokens} tokens reserved")
        if not self._free_slots:
            raise RuntimeError("no free slot")
        if need > len(self._free_blocks):
            raise RuntimeError(f"need {need} KV blocks, {len(self._free_blocks)} free")
        self.retain(shared)
        slot = self._free_slots.pop()
        fresh = [self._free_blocks.pop() for _ in range(need)]
        for b in fresh:
            self._refs[b] = 1
        self._tables[slot] = shared + fresh
        return slot

    def retain(self, blocks: Iterable[int]) -> None:
        """One more holder for each of these (held) blocks."""
        blocks = list(blocks)
        for b in blocks:
            if b not in self._refs:
                raise KeyError(f"block {b} is free; only a held block can be shared")
        for b in blocks:
            self._refs[b] += 1

    def release(self, blocks: Iterable[int]) -> None:
        """One holder fewer for each block; a block nobody holds is free again."""
        for b in blocks:
            n = self._refs.get(b, 0)
            if n < 1:
                raise KeyError(f"block {b} released more often than held")
            if n == 1:
                del self._refs[b]
                self._free_blocks.append(b)
            else:
                self._refs[b] = n - 1

    def refcount(self, block: int) -> int:
        return self._refs.get(block, 0)

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
        self.release(reversed(self._tables.pop(slot)))
        self._free_slots.append(slot)
