"""Append-only, fsync'd journal of finished records for one input file.

File layout (text, UTF-8):
    line 1:  {"journal": 1, "fingerprint": "<sha256 of input identity + job parameters>"}
    then:    <line index>\\t<e|k>\\t<generated tokens>\\t<output line JSON>\\n
             (e = the record's response is an error object, k = ok)
Records are appended in completion order by one writer thread and fsync'd in groups (group
commit), so a record counts as done only once it is on disk. On open the journal is read back
and validated line by line; the first line that is torn (no "\\n": the process died mid-write)
or unreadable ends it and the file is truncated there, so those records simply run again.
A journal whose fingerprint differs (other input bytes, parameters or model) is set aside
(renamed *.stale) and the file starts over: outputs of two different jobs are never mixed.
A line index that appears twice keeps its first entry (outputs are deterministic anyway).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

log = logging.getLogger("serve.batch")


@dataclass(slots=True)  # one per record: keep it small (~150 bytes a record with its dict slot)
class Entry:
    offset: int  # byte offset of the output JSON inside the journal file
    length: int  # its length in bytes (without "\n")
    error: bool
    tokens: int


class Journal:
    def __init__(self, path: str, fingerprint: str):
        self.path = path
        self.fingerprint = fingerprint
        self.entries: dict[int, Entry] = {}
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        end = self._load()
        self._f = open(path, "r+b" if end else "w+b")
        self._f.truncate(end)
        self._f.seek(end)
        if not end:
            self._f.write(json.dumps({"journal": 1, "fingerprint": fingerprint}).encode() + b"\n")
            self.sync()
        self._pos = self._f.tell()

    def _load(self) -> int:
        """Read back an existing journal; returns the byte offset where its valid part ends (0 = none)."""
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return 0
        with f:
            header = f.readline()
            try:
                head = json.loads(header) if header.endswith(b"\n") else {}
                ok = head.get("fingerprint") == self.fingerprint
            except (ValueError, AttributeError):
                ok = False
            if not ok:
                if header:
                    stale = f"{self.path}.stale-{int(time.time())}"
                    os.replace(self.path, stale)
                    log.warning("journal %s belongs to another job (input or parameters changed); "
                                "moved to %s and starting this file over", self.path, stale)
                return 0
            end = f.tell()
            for line in f:
                parsed = _parse(line)
                if parsed is None:
                    log.warning("journal %s: dropping a torn/unreadable tail at byte %d", self.path, end)
                    break
                index, error, tokens, body_start = parsed
                self.entries.setdefault(index, Entry(end + body_start, len(line) - body_start - 1, error, tokens))
                end += len(line)
            return end

    def append(self, index: int, line: bytes, error: bool, tokens: int) -> None:
        """Buffered: durable only after sync(). `line` is one JSON document without newline."""
        head = f"{index}\t{'e' if error else 'k'}\t{tokens}\t".encode()
        self._f.write(head + line + b"\n")
        if index not in self.entries:
            self.entries[index] = Entry(self._pos + len(head), len(line), error, tokens)
        self._pos += len(head) + len(line) + 1

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def read(self, e: Entry) -> bytes:
        """The output line of a journalled record (after sync())."""
        return os.pread(self._f.fileno(), e.length, e.offset)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def remove(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _parse(line: bytes) -> tuple[int, bool, int, int] | None:
    """-> (index, is_error, tokens, offset of the JSON in the line) or None if torn/corrupt."""
    if not line.endswith(b"\n"):
        return None
    parts = line.split(b"\t", 3)
    if len(parts) != 4 or parts[1] not in (b"e", b"k"):
        return None
    try:
        index, tokens = int(parts[0]), int(parts[2])
        json.loads(parts[3])
    except ValueError:
        return None
    return index, parts[1] == b"e", tokens, len(parts[0]) + len(parts[1]) + len(parts[2]) + 3
