"""Disk tier of the prefix cache (model/engine/prefix_cache.py decides what goes here, within its byte budget):
snapshot files on local disk, and the session pins that let a restarted worker find its sessions' state. torch-free:
payloads are bytes (the Copier turns its host buffer into bytes and back: model/runtime/snapshots.py).

One file per snapshot, `<dir>/<key>.snap`, key = blake2b(namespace, ids):
    MAGIC (8) | header length (u32) | payload length (u64) | header (JSON) | payload | blake3 of all before (32)
    header: {"v", "identity" (model + state layout), "namespace", "ids", "payload"}
A read checks, in this order, the length (a truncated file), the checksum (a torn or bit-flipped one), then the
identity, namespace and ids (a foreign file: another model, adapter or layout); a file failing any is deleted,
counted (`disk_discarded_*`) and never loaded: the request falls back to a shorter snapshot or a full prefill.

Session pins: `<dir>/pins/<session>.json` {"identity", "key", "conversation"}, written after the snapshot file
they name. At start, `scan()` indexes every valid file (headers only) and the pins.

Writes go through one background thread (the engine loop only queues them): a file is written to a temporary
name and renamed, so a killed worker leaves either the whole file or none (the checksum covers a machine crash,
which skips the page cache: no fsync, the tier must outlive a process, not the instance). Queued bytes are
bounded (`max_pending_bytes`); a full queue refuses the write and the snapshot is dropped instead. Reads are
inline, in one pass (the restore waits for them anyway); a read of a file still queued returns its bytes.
Measured cost: bench/disk_tier_bench.py (README "Prefix reuse").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from model.checkpoint.identity import checkpoint_identity
from model.types import Copier, EngineConfig

log = logging.getLogger(__name__)
MAGIC = b"GRHSNAP1"
_PRE = struct.Struct("<8sIQ")
DIGEST = 32
VERSION = 1
MAX_PENDING_BYTES = 512 << 20
_SUFFIX = ".snap"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,199}$")


@dataclass(frozen=True)
class DiskEntry:
    """A valid snapshot file found at start."""

    key: str
    namespace: str
    ids: tuple[int, ...]
    size: int  # bytes on disk
    mtime: float


@dataclass(eq=False)
class _Job:
    key: str
    path: Path
    head: bytes  # prefix + header, or the whole text of a pin file
    packed: object = None  # the copier's host buffer (None: `head` is the whole file)
    size: int = 0
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class DiskTier:
    def __init__(self, directory: str | Path, identity: str, budget: int, to_bytes: Callable[[object], memoryview],
                 max_pending_bytes: int = MAX_PENDING_BYTES) -> None:
        self.dir = Path(directory)
        (self.dir / "pins").mkdir(parents=True, exist_ok=True)
        self.identity, self.budget, self._to_bytes = identity, budget, to_bytes
        self.max_pending_bytes = max_pending_bytes
        self.counters = dict(disk_writes=0, disk_write_errors=0, disk_writes_refused=0, disk_reads=0,
                             disk_discarded_truncated=0, disk_discarded_corrupt=0, disk_discarded_foreign=0,
                             disk_bytes_written=0, disk_bytes_read=0, disk_write_seconds=0.0, disk_read_seconds=0.0)
        self._cv = threading.Condition()
        self._queue: list[_Job] = []
        self._pending: dict[str, _Job] = {}  # key or "pin:<session>" -> its queued / in-progress job
        self._pending_bytes = 0
        self._rbuf = bytearray()  # reads land here (reused)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="snapshot-writer", daemon=True)
        self._thread.start()

    # ---- names and sizes -------------------------------------------------------------------------
    @staticmethod
    def key(namespace: str, ids) -> str:
        return hashlib.blake2b(json.dumps([namespace, list(ids)]).encode(), digest_size=16).hexdigest()

    def _head(self, namespace: str, ids, payload_len: int) -> bytes:
        header = json.dumps({"v": VERSION, "identity": self.identity, "namespace": namespace, "ids": list(ids),
                             "payload": payload_len}, separators=(",", ":")).encode()
        return _PRE.pack(MAGIC, len(header), payload_len) + header

    def file_size(self, namespace: str, ids, payload_len: int) -> int:
        """Bytes the file of this snapshot takes (what the cache accounts before writing it)."""
        return len(self._head(namespace, ids, payload_len)) + payload_len + DIGEST

    def _path(self, key: str) -> Path:
        return self.dir / (key + _SUFFIX)

    def _pin_path(self, session: str) -> Path:
        # the session id as the name when it is a safe one (the server's are), else its digest (never a path)
        name = session if _SAFE.match(session) else "h-" + hashlib.blake2b(session.encode(), digest_size=16).hexdigest()
        return self.dir / "pins" / (name + ".json")

    # ---- writes (queued) --------------------------------------------------------------------------
    def write(self, namespace: str, ids, packed: object, payload_len: int) -> str | None:
        """Queue the file of a snapshot; its key, or None when the queue is full (nothing written)."""
        key = self.key(namespace, ids)
        head = self._head(namespace, ids, payload_len)
        job = _Job(key, self._path(key), head, packed, len(head) + payload_len + DIGEST)
        with self._cv:
            if self._pending_bytes + job.size > self.max_pending_bytes and self._pending_bytes:
                self.counters["disk_writes_refused"] += 1
                return None
            self._enqueue(job)
        return key

    def write_pin(self, session: str, key: str, conversation) -> None:
        text = json.dumps({"identity": self.identity, "session": session, "key": key,
                           "conversation": list(conversation)}).encode()
        with self._cv:
            self._enqueue(_Job("pin:" + session, self._pin_path(session), text))

    def _enqueue(self, job: _Job) -> None:
        old = self._pending.pop(job.key, None)
        if old is not None:
            old.cancelled = True
            self._pending_bytes -= old.size
        self._pending[job.key] = job
        self._pending_bytes += job.size
        self._queue.append(job)
        self._cv.notify_all()

    def delete(self, key: str) -> None:
        self._remove(key, self._path(key))

    def delete_pin(self, session: str) -> None:
        self._remove("pin:" + session, self._pin_path(session))

    def _remove(self, key: str, path: Path) -> None:
        with self._cv:
            job = self._pending.pop(key, None)
            if job is not None:
                job.cancelled = True
                self._pending_bytes -= job.size
            path.unlink(missing_ok=True)

    def wait_pin(self, session: str, timeout: float) -> bool:
        """Wait until the session's pin (and so its snapshot, queued before it) is on disk."""
        with self._cv:
            job = self._pending.get("pin:" + session)
        return job is None or job.done.wait(timeout)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued write is done."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._pending, timeout)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._queue or self._stop)
                if not self._queue:
                    return
                job = self._queue.pop(0)
            if not job.cancelled:
                self._write(job)
            with self._cv:
                if self._pending.get(job.key) is job:
                    del self._pending[job.key]
                    self._pending_bytes -= job.size
                job.done.set()
                self._cv.notify_all()

    def _write(self, job: _Job) -> None:
        tmp = job.path.with_name(f".{job.path.name}.{os.getpid()}.tmp")
        t0 = time.perf_counter()
        try:
            with open(tmp, "wb") as f:
                f.write(job.head)
                if job.packed is not None:
                    payload = self._to_bytes(job.packed)  # may wait for a device copy: here, off the loop
                    if len(job.head) + len(payload) + DIGEST != job.size:
                        raise ValueError(f"payload of {len(payload)} bytes, {job.size} accounted")
                    h = _hasher(len(payload))
                    h.update(job.head)
                    h.update(payload)
                    f.write(payload)
                    f.write(h.digest())
            with self._cv:
                if job.cancelled:  # deleted while it was being written
                    tmp.unlink(missing_ok=True)
                    return
                os.replace(tmp, job.path)
            self.counters["disk_writes"] += 1
            self.counters["disk_bytes_written"] += job.size
        except Exception:
            log.exception("disk tier: writing %s failed", job.path.name)
            self.counters["disk_write_errors"] += 1
            tmp.unlink(missing_ok=True)
        finally:
            job.packed = None
            self.counters["disk_write_seconds"] += time.perf_counter() - t0

    # ---- reads -----------------------------------------------------------------------------------
    def read(self, key: str, namespace: str, ids) -> memoryview | None:
        """The payload of the snapshot (namespace, ids), checked; None when the file is missing or was discarded.
        The view is valid until the next read (one reader: the engine loop, which restores it at once)."""
        with self._cv:
            job = self._pending.get(key)
            packed = job.packed if job is not None else None
        if packed is not None:
            return self._to_bytes(packed)  # still queued: its bytes are in memory
        path = self._path(key)
        t0 = time.perf_counter()
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if len(self._rbuf) < size:  # grown, never shrunk: fresh memory costs more than the read itself
                    self._rbuf = bytearray(size)
                got = f.readinto(memoryview(self._rbuf)[:size])
        except FileNotFoundError:
            return None
        except OSError:
            log.exception("disk tier: reading %s failed", path.name)
            return None
        view = memoryview(self._rbuf)[:got]
        why, header, start = self._check(view, whole=True)
        if why is None and (header["namespace"] != namespace or tuple(header["ids"]) != tuple(ids)):
            why = "foreign"
        if why is not None:
            self._discard(path, why)
            return None
        self.counters["disk_reads"] += 1
        self.counters["disk_bytes_read"] += got
        self.counters["disk_read_seconds"] += time.perf_counter() - t0
        return view[start:start + header["payload"]]

    def _check(self, view: memoryview, whole: bool, size: int | None = None) -> tuple[str | None, dict, int]:
        """(None, header, payload offset) for a file of this model; else (why, {}, 0). `whole`: `view` is the
        whole file (checksum checked); else its first bytes and `size` its length."""
        size = len(view) if size is None else size
        if len(view) < _PRE.size:
            return "truncated", {}, 0
        magic, hlen, plen = _PRE.unpack_from(view)
        if magic != MAGIC:
            return "corrupt", {}, 0
        start = _PRE.size + hlen
        if size != start + plen + DIGEST:
            return "truncated", {}, 0
        if whole and _hasher(size).update(view[:-DIGEST]).digest() != bytes(view[-DIGEST:]):
            return "corrupt", {}, 0
        if len(view) < start:
            return "truncated", {}, 0
        try:
            header = json.loads(bytes(view[_PRE.size:start]))
        except ValueError:
            return "corrupt", {}, 0
        if not isinstance(header, dict) or header.get("payload") != plen:
            return "corrupt", {}, 0
        if header.get("v") != VERSION or header.get("identity") != self.identity:
            return "foreign", {}, 0
        return None, header, start

    def _discard(self, path: Path, why: str) -> None:
        log.warning("disk tier: %s discarded (%s)", path.name, why)
        self.counters[f"disk_discarded_{why}"] += 1
        path.unlink(missing_ok=True)

    # ---- start ------------------------------------------------------------------------------------
    def scan(self) -> tuple[list[DiskEntry], dict[str, tuple[str, tuple[int, ...]]]]:
        """The valid snapshot files (oldest first; headers checked, checksums at read) and the session pins
        {session: (key, conversation)}; temporary files, foreign and truncated files are deleted."""
        entries = []
        for path in self.dir.iterdir():
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a write cut by a kill
                continue
            if not path.name.endswith(_SUFFIX):
                continue
            try:
                st = path.stat()
                with open(path, "rb") as f:
                    pre = f.read(_PRE.size)
                    hlen = _PRE.unpack(pre)[1] if len(pre) == _PRE.size and pre[:8] == MAGIC else 0
                    head = pre + f.read(min(hlen, st.st_size))
            except OSError:
                continue
            why, header, _ = self._check(memoryview(head), whole=False, size=st.st_size)
            if why is None and self.key(header["namespace"], header["ids"]) != path.name[:-len(_SUFFIX)]:
                why = "foreign"
            if why is not None:
                self._discard(path, why)
                continue
            entries.append(DiskEntry(path.name[:-len(_SUFFIX)], header["namespace"], tuple(header["ids"]),
                                     st.st_size, st.st_mtime))
        entries.sort(key=lambda e: e.mtime)
        pins = {}
        for path in (self.dir / "pins").glob("*.json"):
            try:
                obj = json.loads(path.read_bytes())
                if obj["identity"] != self.identity:
                    raise ValueError("foreign")
                if self._pin_path(obj["session"]) != path:
                    raise ValueError("misnamed")
                pins[obj["session"]] = (str(obj["key"]), tuple(int(t) for t in obj["conversation"]))
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)
        return entries, pins

    def stats(self) -> dict:
        out = dict(self.counters)
        out["disk_discarded"] = sum(v for k, v in self.counters.items() if k.startswith("disk_discarded_"))
        with self._cv:  # host memory the tier holds outside the cache's tiers: queued writes, the read buffer
            out["disk_pending_bytes"] = self._pending_bytes
        out["disk_read_buffer_bytes"] = len(self._rbuf)
        return out


def _hasher(size: int):
    # blake3 on every core for a snapshot-sized input (GPU instances have many; a 37 MiB state is ~7 ms on one)
    return blake3.blake3(max_threads=blake3.blake3.AUTO if size > (8 << 20) else 1)


def open_tier(config: EngineConfig, model_dir: Path, copier: Copier) -> DiskTier | None:
    """The engine's disk tier (SNAPSHOT_DISK_DIR / SNAPSHOT_DISK_BYTES), or None when it is off."""
    if not config.prefix_cache or config.snapshot_disk_bytes <= 0 or not config.snapshot_disk_dir:
        return None
    ident = hashlib.blake2b(f"{checkpoint_identity(model_dir)}|{copier.layout}".encode(), digest_size=32).hexdigest()
    return DiskTier(config.snapshot_disk_dir, ident, config.snapshot_disk_bytes, copier.to_bytes)
