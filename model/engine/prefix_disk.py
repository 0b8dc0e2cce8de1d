"""The prefix cache's disk tier policy (torch-free): what leaves memory for the disk tier and when files go, as a
part of PrefixCache (model/engine/prefix_cache.py, which holds the budgets, the LRU and the index; the file format
and its checks are model/runtime/disk_tier.py behind the SnapshotStore seam in model/types.py).

  spill        a snapshot leaving host memory (or the device, when the host tier cannot take it) is written to a
               file and forgotten in memory; without a disk tier, or when the disk budget cannot take it (every
               file pinned), it is dropped.
  budget       a file's bytes are accounted before it is queued; room is made by deleting the least recently used
               unpinned files, so the bytes on disk never exceed the budget.
  write-through  a session's snapshot (pinned) gets a file and a pin naming it with the conversation, so a worker
               restarted on the same folder resumes the session; a session turn also writes its prompt's end
               snapshot through (unpinned): a chat turn re-renders the answer, so the next resumes there.
"""

from __future__ import annotations

import logging

DEVICE, HOST, DISK = "device", "host", "disk"
log = logging.getLogger("model.engine.prefix_cache")


class DiskTierPolicy:
    """Mixed into PrefixCache: uses its store, copier, lru, counters, disk budget and accounting, _drop."""

    def _spill(self, snap) -> None:
        """Out of memory (device or host) to the disk tier; dropped when there is none or it cannot take it."""
        if snap.disk is None and not self._spill_copy(snap):
            self._drop(snap, evicted=True)
            return
        self._leave_memory(snap)
        snap.tier, snap.data = DISK, None
        self.counters["spills"] += 1

    def _leave_memory(self, snap) -> None:
        if snap.tier == DEVICE:
            self._release_blocks(snap)
            self._dev_count -= 1
        elif snap.tier == HOST:
            self._host_used -= snap.nbytes
            snap.nbytes = 0

    def _to_disk(self, snap, packed) -> bool:
        """Queue the snapshot's file within the disk budget (older unpinned files deleted for room)."""
        n = len(snap.ids)
        size = self.store.file_size(snap.namespace, snap.ids, self.copier.host_bytes(n))
        if size > self.disk_budget:
            return False
        while self._disk_used + size > self.disk_budget:
            victim = next((s for s in self.lru.values() if s.disk and not s.pins and s is not snap), None)
            if victim is None:
                return False
            self._forget_file(victim)
            if victim.tier == DISK:
                self._drop(victim, evicted=True)
        key = self.store.write(snap.namespace, snap.ids, packed, self.copier.host_bytes(n))
        if key is None:
            return False
        snap.disk, snap.disk_bytes = key, size
        self._disk_used += size
        return True

    def _forget_file(self, snap) -> None:
        if snap.disk is not None:
            self.store.delete(snap.disk)
            self._disk_used -= snap.disk_bytes
            snap.disk, snap.disk_bytes = None, 0

    def _spill_copy(self, snap) -> bool:
        """Give a snapshot in memory a file (it stays where it is); False when it cannot have one."""
        if self.store is None:
            return False
        try:  # a device snapshot is packed into a host buffer first (the one the host tier would hold)
            packed = snap.data if snap.tier == HOST else self.copier.to_host(snap.data, list(snap.blocks),
                                                                             len(snap.ids))
        except Exception:  # e.g. no memory to stage it
            log.exception("prefix cache: staging a snapshot of %d tokens for disk failed", len(snap.ids))
            return False
        return self._to_disk(snap, packed)

    def wait_persisted(self, session: str, timeout: float) -> bool:
        """Wait (without the engine's lock) until the session's pin and snapshot are on disk."""
        return self.store is None or self.store.wait_pin(session, timeout)

    def _persist_pin(self, session: str, snap, conversation) -> None:
        if snap.disk is None and (snap.tier == DISK or not self._spill_copy(snap)):
            self.counters["sessions_not_persisted"] += 1
            self.store.delete_pin(session)
            return
        self.store.write_pin(session, snap.disk, conversation)
