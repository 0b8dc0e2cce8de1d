"""Abandoned requests: a non-streaming request whose client hung up, or that ran past its deadline,
has its sequences cancelled so their slots free at the next engine step (torch-free).

SageMaker stops waiting for a real-time answer after 60 s and botocore's standard retry mode sends the
same request again: without this, one slow call leaves up to three copies generating for nobody.
Streams need no watch: a write to a closed connection ends their generator (serve/generate.py).

One daemon thread polls every watched request's socket (a non-blocking MSG_PEEK: b"" means the peer
closed) and deadline every POLL_S; `watching()` binds a Watch to the request's thread, and
serve/generate.py adds every handle it submits for a non-streaming request to the current Watch.
"""

from __future__ import annotations

import contextlib
import contextvars
import socket
import threading
import time
from collections.abc import Iterator

from serve.engine_client import RequestHandle

POLL_S = 0.1
DISCONNECTED = "disconnected"
DEADLINE = "deadline"

_current: contextvars.ContextVar[Watch | None] = contextvars.ContextVar("granite_watch", default=None)


class Watch:
    """The generation work of one HTTP request. `reason` is set once it is abandoned."""

    def __init__(self, sock: socket.socket | None, timeout_s: float | None) -> None:
        self.sock = sock
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s if timeout_s else None
        self.reason: str | None = None
        self._handles: list[RequestHandle] = []
        self._lock = threading.Lock()

    def add(self, handle: RequestHandle) -> None:
        with self._lock:
            if self.reason is None:
                self._handles.append(handle)
                return
        handle.cancel()  # already abandoned: never let it run

    def abandon(self, reason: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason, handles, self._handles = reason, self._handles, []
        for h in handles:
            h.cancel()  # idempotent, a no-op for finished handles

    def check(self, now: float) -> None:
        if self.deadline is not None and now >= self.deadline:
            self.abandon(DEADLINE)
        elif self.sock is not None and peer_closed(self.sock):
            self.abandon(DISCONNECTED)


def peer_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False  # open, nothing to read (or a pipelined next request waiting: also open)
    except OSError:
        return True  # reset, or already closed on our side


class _Watchdog:
    def __init__(self) -> None:
        self._watches: set[Watch] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, w: Watch) -> None:
        with self._lock:
            self._watches.add(w)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="request-watchdog", daemon=True)
                self._thread.start()

    def discard(self, w: Watch) -> None:
        with self._lock:
            self._watches.discard(w)

    def _run(self) -> None:
        while True:
            time.sleep(POLL_S)
            with self._lock:
                watches = list(self._watches)
            now = time.monotonic()
            for w in watches:
                w.check(now)


_WATCHDOG = _Watchdog()


@contextlib.contextmanager
def watching(sock: socket.socket | None, timeout_s: float | None) -> Iterator[Watch]:
    """Watch the work submitted in this block (this thread) until it ends."""
    w = Watch(sock, timeout_s)
    token = _current.set(w)
    if sock is not None or w.deadline is not None:
        _WATCHDOG.add(w)
    try:
        yield w
    finally:
        _WATCHDOG.discard(w)
        _current.reset(token)


def current() -> Watch | None:
    return _current.get()
