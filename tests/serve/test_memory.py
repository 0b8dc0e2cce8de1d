"""serve/memory.py: the glibc malloc settings of a worker (issue 20 item 4) and when the trimmer trims."""

from __future__ import annotations

import ctypes

from serve import memory
from serve.config import load_config
from serve.metrics import resident_bytes


def test_freed_heap_memory_stays_resident_until_trimmed():
    # the effect the soak saw: buffers below the mmap threshold, freed under a live one, keep their pages
    assert memory._glibc() is not None  # this image is Linux + glibc: the settings are not silently skipped
    memory.trim()
    blocks = [ctypes.create_string_buffer(64 << 10) for _ in range(2000)]  # ~128 MiB from the arena heap
    pins = [ctypes.create_string_buffer(64 << 10) for _ in range(2)]  # above them: the heap's top stays in use
    full = resident_bytes()
    blocks.clear()
    freed = resident_bytes()
    assert memory.trim() is True
    trimmed = resident_bytes()
    assert freed > full - (32 << 20) and trimmed < freed - (64 << 20), (full >> 20, freed >> 20, trimmed >> 20)
    assert memory.limit_arenas(0) is False and len(pins) == 2  # 0: glibc's default, nothing applied


def test_trimmer_trims_once_per_idle_period_after_work():
    state = {"running": 1, "waiting": 0, "requests_total": 1, "prefix_cache": {"evictions": 0, "demotions": 0}}
    t = memory.Trimmer(lambda: state)
    assert t.check() is False  # busy: never trims while generating
    state["running"] = 0
    assert t.check() is True and t.check() is False  # idle after work: once
    state["requests_total"] = 2
    assert t.check() is True
    state["prefix_cache"] = {"evictions": 3, "demotions": 0}
    assert t.check() is True and t.check() is False


def test_config():
    c = load_config({"MEMORY_ARENAS": "4", "MEMORY_TRIM": "false"}).server
    assert c.memory_arenas == 4 and c.memory_trim is False
    d = load_config({}).server
    assert d.memory_arenas == 2 and d.memory_trim is True
