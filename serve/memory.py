"""glibc malloc for a long-running worker (issue 20 item 4): where RSS went that no cache accounts for.

Snapshots (model/runtime/snapshots.py) are host buffers of many sizes (state + KV of n tokens), made by the engine
thread and freed when evicted, besides the request objects of many server threads. glibc serves them from up to
8 x cores arenas, and after the first large free it raises its mmap threshold (up to 32 MiB), so later buffers of
that size come from an arena heap, whose freed middle it keeps: RSS then grows wave after wave while the bytes the
caches hold stay flat. Two settings, applied in each worker before the app loads (serve/gunicorn_conf.py):
  arenas   M_ARENA_MAX: at most this many arenas (0 = glibc's default)
  trim     malloc_trim(0) when the engine has gone idle after work (Trimmer, a background thread): free pages of
           every arena go back to the OS
Linux + glibc only; elsewhere both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable

log = logging.getLogger("serve")
M_ARENA_MAX = -8  # glibc malloc.h
_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
        except OSError:
            _libc = False
    return _libc or None


def limit_arenas(n: int) -> bool:
    """At most n malloc arenas for this process (call before its threads start); False where not applied."""
    lib = _glibc()
    return bool(n > 0 and lib is not None and lib.mallopt(M_ARENA_MAX, n) == 1)


def trim() -> bool:
    """Give the free pages of every arena back to the OS; True when some were."""
    lib = _glibc()
    return bool(lib is not None and lib.malloc_trim(0))


class Trimmer:
    """Trims once each time the engine goes idle after work (no running or waiting sequence, and requests or
    evictions happened since the last trim): never while it generates, at most every `period_s`."""

    def __init__(self, stats: Callable[[], dict], period_s: float = 5.0) -> None:
        self.stats, self.period_s = stats, period_s
        self.trims = 0
        self._mark: tuple | None = None
        self._stop = threading.Event()

    def check(self) -> bool:
        s = self.stats() or {}
        pc = s.get("prefix_cache") or {}
        mark = (s.get("requests_total", 0), pc.get("evictions", 0), pc.get("demotions", 0))
        if s.get("running", 0) or s.get("waiting", 0) or mark == self._mark:
            return False
        self._mark = mark
        self.trims += trim()
        return True

    def start(self) -> None:
        def run() -> None:
            while not self._stop.wait(self.period_s):
                try:
                    self.check()
                except Exception:  # never take the worker down for this
                    log.exception("memory: trim failed")

        threading.Thread(target=run, name="memory-trim", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
