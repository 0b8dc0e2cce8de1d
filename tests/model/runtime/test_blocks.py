"""SlotAllocator: slots + KV blocks reserved up front, returned on free."""

from __future__ import annotations

import random

import pytest

from model.runtime.blocks import SlotAllocator, blocks_needed


def test_blocks_needed():
    assert [blocks_needed(n, 16) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]


def test_allocate_reserves_ceil_blocks_and_free_returns_them():
    a = SlotAllocator(num_slots=3, num_blocks=10, block_size=4)
    s0 = a.allocate(9)  # 3 blocks
    s1 = a.allocate(4)  # 1 block
    assert s0 != s1 and a.num_free_slots == 1 and a.num_free_blocks == 6
    assert len(a.block_table(s0)) == 3 and len(a.block_table(s1)) == 1
    assert not set(a.block_table(s0)) & set(a.block_table(s1))
    assert a.capacity(s0) == 12
    a.free(s0)
    assert a.num_free_slots == 2 and a.num_free_blocks == 9
    a.free(s1)
    assert a.num_free_slots == 3 and a.num_free_blocks == 10


def test_can_allocate_limits():
    a = SlotAllocator(num_slots=2, num_blocks=4, block_size=8)
    assert a.can_allocate(32) and not a.can_allocate(33)
    s = a.allocate(20)  # 3 blocks
    assert a.can_allocate(8) and not a.can_allocate(9)
    a.allocate(1)
    assert not a.can_allocate(1)  # no slot left
    with pytest.raises(RuntimeError):
        a.allocate(1)
    a.free(s)
    with pytest.raises(RuntimeError, match="blocks"):
        a.allocate(100)


def test_errors():
    a = SlotAllocator(2, 4, 4)
    s = a.allocate(3)
    a.free(s)
    with pytest.raises(KeyError, match="double free"):
        a.free(s)
    with pytest.raises(KeyError):
        a.free(7)
    with pytest.raises(KeyError):
        a.block_table(1)
    with pytest.raises(ValueError):
        a.allocate(0)
    with pytest.raises(ValueError):
        SlotAllocator(0, 4, 4)


def test_random_churn_keeps_accounting_exact():
    rng = random.Random(0)
    a = SlotAllocator(num_slots=8, num_blocks=40, block_size=16)
    live: dict[int, int] = {}
    for _ in range(2000):
        if live and (rng.random() < 0.45 or not a.num_free_slots):
            slot = rng.choice(sorted(live))
            a.free(slot)
            del live[slot]
        else:
            n = rng.randint(1, 200)
            if a.can_allocate(n):
                live[a.allocate(n)] = n
            else:
                with pytest.raises(RuntimeError):
                    a.allocate(n)
        used = [b for s in live for b in a.block_table(s)]
        assert len(used) == len(set(used))  # no block shared by two sequences
        assert len(used) + a.num_free_blocks == 40
        assert len(live) + a.num_free_slots == 8
        assert all(0 <= b < 40 for b in used)
    for slot in list(live):
        a.free(slot)
    assert a.num_free_slots == 8 and a.num_free_blocks == 40


def test_shared_blocks_are_refcounted():
    a = SlotAllocator(num_slots=3, num_blocks=8, block_size=4)
    s0 = a.allocate(10)  # 3 blocks
    held = a.block_table(s0)[:2]
    a.retain(held)  # a snapshot holds the first two
    a.free(s0)
    assert a.num_free_blocks == 6 and all(a.refcount(b) == 1 for b in held)
    assert a.can_allocate(32, shared=2) and not a.can_allocate(33, shared=2)
    s1 = a.allocate(12, shared=held)  # resumed: shares them, one fresh block
    assert a.block_table(s1)[:2] == held and a.num_free_blocks == 5
    assert all(a.refcount(b) == 2 for b in held)
    a.free(s1)
    a.release(held)
    assert a.num_free_blocks == 8 and a.refcount(held[0]) == 0
    with pytest.raises(KeyError):
        a.release(held[:1])  # more releases than holds
    with pytest.raises(KeyError):
        a.retain([0])  # a free block cannot be shared
