"""AdapterPool: the LoRA adapters one runner serves (model/types.py AdapterSlots is its torch-free face).

Three tiers:
  registered   name -> its folder, checked once at registration (model/checkpoint/adapters.py)
  host         the checked weights in host memory, least recently used out past LORA_HOST_BYTES (an adapter
               in use is never evicted; an evicted one is read and checked again from its folder by hold())
  device       MAX_LORAS slots of the projections' stacks (model/network/lora.py), preallocated before the KV
               pool is sized; an adapter is copied in when a sequence using it is admitted and no slot holds it,
               into a free slot or the least recently used one no admitted sequence uses. When every device slot
               is in use by other adapters, admission waits (can_bind), so a step never holds more than MAX_LORAS.

Lifecycle: hold(name) at submit (unknown or being removed: 404), release at the sequence's end; unregister marks
the adapter removed (new holds refused) and frees its host and device copies after its last release. The
prefix-cache namespace of an adapter is name@<digest of its files>: a snapshot made under one adapter (or an
earlier adapter of the same name) never resumes another.

Threads: register / unregister / hold / release come from request threads, can_bind / bind / unbind from the
engine loop (the scheduler); one lock guards the bookkeeping, and device copies happen only in bind (the loop).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.checkpoint.adapters import CONFIG, WEIGHTS, AdapterError, LoraAdapter, load_adapter, target_shapes
from model.network import lora
from model.types import AdapterExists, AdapterInvalid, AdapterNotFound

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    name: str
    path: Path
    namespace: str
    rank: int
    nbytes: int  # host bytes of its weights
    registered: float
    weights: LoraAdapter | None = None  # host copy (None: evicted, reloaded by hold)
    holds: int = 0  # sequences submitted and not ended
    users: set[int] = field(default_factory=set)  # state slots bound to it
    device: int | None = None  # its device slot
    removed: bool = False
    last_used: float = 0.0


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for name in (CONFIG, WEIGHTS):
        with open(path / name, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


class AdapterPool:
    def __init__(self, model, max_loras: int, max_rank: int, host_bytes: int, num_slots: int, device, dtype,
                 op) -> None:
        self.arch, self.max_loras, self.max_rank, self.host_budget = model.arch, max_loras, max_rank, host_bytes
        self.device, self.dtype = torch.device(device), dtype
        self.shapes = target_shapes(self.arch)
        self.step, self.terms = lora.install(model, self.shapes, max_loras, max_rank, self.device, dtype, op)
        self.device_bytes = lora.lora_bytes(self.shapes, max_loras, max_rank, dtype)
        self.slot_index = [-1] * (num_slots + 1)  # state slot -> device adapter slot (-1: none); + the dummy slot
        self._entries: dict[str, _Entry] = {}
        self._on_device: list[str | None] = [None] * max_loras
        self._lock = threading.Lock()
        self.counters = dict(registered_total=0, removed_total=0, device_loads_total=0, host_loads_total=0,
                             host_evictions_total=0)

    # ---- registration (request threads) ------------------------------------------------------------
    def register(self, name: str, path: str) -> dict:
        t0 = time.perf_counter()
        with self._lock:
            if name in self._entries:
                raise AdapterExists(f"adapter {name!r} is already registered"
                                    + (" (its removal is still in progress)" if self._entries[name].removed else ""))
        try:
            ad = load_adapter(name, Path(path), self.arch, self.dtype, self.max_rank)
            ns = f"{name}@{digest(ad.path)}"
        except AdapterError as e:
            raise AdapterInvalid(str(e)) from None
        except OSError as e:
            raise AdapterInvalid(f"adapter {name!r}: {type(e).__name__}: {e}") from None
        now = time.monotonic()
        e = _Entry(name, ad.path, ns, ad.rank, ad.nbytes, time.time(), ad, last_used=now)
        with self._lock:
            if name in self._entries:
                raise AdapterExists(f"adapter {name!r} is already registered")
            self._entries[name] = e
            self.counters["registered_total"] += 1
            self._evict_host()
        log.info("adapter %s registered from %s: rank %d, %d projections, %.1f MB, in %.2f s", name, ad.path, ad.rank,
                 len(ad.weights), ad.nbytes / 1e6, time.perf_counter() - t0)
        return self._describe(e)

    def unregister(self, name: str) -> None:
        with self._lock:
            e = self._entries.get(name)
            if e is None or e.removed:
                raise AdapterNotFound(f"adapter {name!r} is not registered")
            e.removed = True
            self.counters["removed_total"] += 1
            self._drop_if_done(e)

    def list(self) -> list[dict]:
        with self._lock:
            return [self._describe(e) for e in self._entries.values() if not e.removed]

    def _describe(self, e: _Entry) -> dict:
        return {"name": e.name, "src": str(e.path), "rank": e.rank, "bytes": e.nbytes, "namespace": e.namespace,
                "on_device": e.device is not None, "in_use": e.holds, "created": int(e.registered)}

    # ---- sequences (hold / release: request threads and the loop; bind: the loop) -------------------
    def hold(self, name: str) -> str:
        with self._lock:
            e = self._entries.get(name)
            if e is None or e.removed:
                raise AdapterNotFound(f"adapter {name!r} is not registered")
            e.holds += 1
            e.last_used = time.monotonic()
            if e.weights is not None:
                return e.namespace
        try:  # evicted from the host tier: read and check it again (outside the lock)
            ad = load_adapter(name, e.path, self.arch, self.dtype, self.max_rank)
        except (AdapterError, OSError) as err:
            self.release(name)
            raise AdapterInvalid(f"adapter {name!r} could not be reloaded: {err}") from None
        with self._lock:
            e.weights = e.weights or ad
            self.counters["host_loads_total"] += 1
            self._evict_host()
        return e.namespace

    def release(self, name: str) -> None:
        with self._lock:
            e = self._entries.get(name)
            if e is not None:
                e.holds = max(0, e.holds - 1)
                self._drop_if_done(e)

    def can_bind(self, name: str) -> bool:
        with self._lock:
            e = self._entries[name]
            return e.device is not None or self._free_device() is not None

    def bind(self, slot: int, name: str) -> None:
        with self._lock:
            e = self._entries[name]
            if e.device is None:
                i = self._free_device()
                if i is None:
                    raise RuntimeError(f"no device adapter slot for {name!r} (admission should have waited)")
                old = self._on_device[i]
                if old is not None:
                    self._entries[old].device = None
                self._on_device[i], e.device = name, i
                self._copy_in(e.weights, i)
                self.counters["device_loads_total"] += 1
            e.users.add(slot)
            e.last_used = time.monotonic()
            self.slot_index[slot] = e.device

    def unbind(self, slot: int) -> None:
        with self._lock:
            i = self.slot_index[slot]
            self.slot_index[slot] = -1
            name = self._on_device[i] if i >= 0 else None
            if name is not None:
                self._entries[name].users.discard(slot)

    def warm(self) -> None:
        """Before serving: run the LoRA op once per distinct projection shape with an eager step's segments, so
        the Triton kernels (CUDA) compile now, not under the first adapter request (fixed-buffer decode's variant
        compiles when its graphs are captured). The stacks are zeros or whatever is loaded; y is a scratch row."""
        step = lora.LoraStep(self.device, self.max_loras, self.max_rank)
        step.set_rows([0])
        seen = set()
        with torch.no_grad():
            for term in self.terms.values():
                key = (term.A.shape[2], term.B.shape[1])
                if key not in seen:
                    seen.add(key)
                    x = torch.zeros(1, key[0], device=self.device, dtype=self.dtype)
                    term.op(x, torch.zeros(1, key[1], device=self.device, dtype=self.dtype), term.A, term.B, step)

    # ---- the runner's step -------------------------------------------------------------------------
    def rows(self, slots) -> list[int]:
        """Device adapter slot per state slot (-1: none)."""
        return [self.slot_index[s] for s in slots]

    def report(self) -> dict:
        with self._lock:
            live = [e for e in self._entries.values() if not e.removed]
            return dict(self.counters, max_loras=self.max_loras, max_lora_rank=self.max_rank,
                        device_bytes=self.device_bytes, registered=len(live), entries=len(self._entries),
                        host_bytes=sum(e.nbytes for e in self._entries.values() if e.weights is not None),
                        on_device=sum(n is not None for n in self._on_device))

    # ---- internals (under the lock) -----------------------------------------------------------------
    def _free_device(self) -> int | None:
        """A device slot to load into: a free one, else the least recently used adapter no slot uses."""
        idle = []
        for i, n in enumerate(self._on_device):
            if n is None:
                return i
            e = self._entries[n]
            if not e.users:
                idle.append((e.last_used, i))
        return min(idle)[1] if idle else None

    def _copy_in(self, ad: LoraAdapter, i: int) -> None:
        with torch.no_grad():
            for name, term in self.terms.items():
                A, B = term.A[i], term.B[i]
                w = ad.weights.get(name)
                if w is None:
                    A.zero_()
                    B.zero_()
                    continue
                r = w[0].shape[0]
                A[:r].copy_(w[0], non_blocking=True)
                A[r:].zero_()
                B[:, :r].copy_(w[1], non_blocking=True)
                B[:, r:].zero_()

    def _evict_host(self) -> None:
        total = sum(e.nbytes for e in self._entries.values() if e.weights is not None)
        for e in sorted(self._entries.values(), key=lambda e: e.last_used):
            if total <= self.host_budget:
                return
            if e.weights is not None and e.holds == 0 and not e.users:
                e.weights = None
                total -= e.nbytes
                self.counters["host_evictions_total"] += 1

    def _drop_if_done(self, e: _Entry) -> None:
        if not e.removed or e.holds or e.users:
            return
        if e.device is not None:
            self._on_device[e.device] = None
        e.weights, e.device = None, None
        del self._entries[e.name]
        log.info("adapter %s removed and freed", e.name)
