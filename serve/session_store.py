"""The session table on disk (serve/sessions.py), so a worker that restarts finds its sessions again. torch-free.

One small JSON file per session in the worker's folder, `<SNAPSHOT_DISK_DIR>/w<index>/sessions/<id>.json`
(the index a restarted gunicorn worker takes over: serve/gunicorn_conf.py), replaced atomically (temporary file
+ rename) whenever the session changes: opened, a turn ended (its conversation: token ids and chat messages, and
its new expiry), closed or expired (then a tombstone {"id", "ended"} without the conversation, so the id keeps
answering 410). The conversation's *state* is the engine's (its disk tier pins it: model/runtime/disk_tier.py).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("serve")


class SessionStore:
    def __init__(self, directory: str | Path, max_ended: int) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_ended = max_ended

    def _path(self, session_id: str) -> Path:
        return self.dir / f"{session_id}.json"

    def save(self, record: dict[str, Any]) -> None:
        """Write a session's record (atomically); a failure is logged, the session goes on in memory."""
        path = self._path(record["id"])
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(json.dumps(record, separators=(",", ":")).encode())
            os.replace(tmp, path)
        except (OSError, TypeError, ValueError):
            log.exception("session %s: could not write its record", record["id"])
            tmp.unlink(missing_ok=True)

    def load(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(live records, tombstones oldest first); unreadable files and tombstones beyond max_ended are deleted."""
        live, ended = [], []
        for path in self.dir.iterdir():
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
                continue
            try:
                rec = json.loads(path.read_bytes())
                if not isinstance(rec, dict) or f"{rec['id']}.json" != path.name:
                    raise ValueError("not a session record")
                (ended if rec.get("ended") else live).append((path.stat().st_mtime, rec))
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("session record %s unreadable: deleted", path.name)
                path.unlink(missing_ok=True)
        ended.sort(key=lambda t: t[0])
        for _, rec in ended[: max(0, len(ended) - self.max_ended)]:
            self._path(rec["id"]).unlink(missing_ok=True)
        return [r for _, r in live], [r for _, r in ended[-self.max_ended:]] if self.max_ended else []
