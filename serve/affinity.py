"""Session affinity across gunicorn workers: a session request always reaches the worker that holds it.

gunicorn hands each connection to whichever worker accepts it, but a session's state lives in one worker's
engine (one worker per GPU). Session ids name their worker (serve/sessions.py), and with more than one
worker each worker also serves the same app on a private unix socket, `<run dir>/worker-<index>.sock`. A
request for another worker's session is forwarded there unchanged (method, path, headers, body) and the
response, streamed or not, is passed back as it arrives. A forwarded request carries FORWARDED_HEADER, so it
is never forwarded twice.
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger("serve")
FORWARDED_HEADER = "X-Granite-Forwarded-By"
# Connection-level headers that belong to one hop, never passed through.
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade",
        "proxy-connection", "host", "date", "server"}


@dataclass(frozen=True)
class WorkerId:
    index: int  # 0 .. count-1, stable across a respawn (the new worker takes the dead one's index)
    count: int
    run_dir: str  # shared by the workers of one server: where their sockets live

    def socket_path(self, index: int) -> str:
        return os.path.join(self.run_dir, f"worker-{index}.sock")


# Set by serve/gunicorn_conf.py in each worker before the app is created; None: one process, no peers.
this_worker: WorkerId | None = None


def _bounded_input(app):
    """werkzeug's server hands the app the raw socket as wsgi.input (gunicorn bounds it by Content-Length):
    bound it here too, so code that reads the rest of a body (serve/routes.py drains unread bodies) stops at
    its end instead of waiting for the forwarding worker to hang up."""
    from werkzeug.wsgi import LimitedStream

    def wrapped(environ, start_response):
        n = environ.get("CONTENT_LENGTH")
        if n and n.isdigit():
            environ["wsgi.input"] = LimitedStream(environ["wsgi.input"], int(n))
        return app(environ, start_response)

    return wrapped


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


@dataclass
class Forwarded:
    status: int
    headers: list[tuple[str, str]]
    body: Iterator[bytes]


class WorkerLink:
    """This worker's private listener, and forwarding to the others."""

    def __init__(self, me: WorkerId, app, timeout_s: float) -> None:
        self.me, self.app, self.timeout_s = me, app, timeout_s
        self._server = None

    def start(self) -> None:
        from werkzeug.serving import make_server

        path = self.me.socket_path(self.me.index)
        if os.path.exists(path):  # a dead worker's socket: this worker took over its index
            os.unlink(path)
        self._server = make_server(f"unix://{path}", 0, _bounded_input(self.app), threaded=True)
        threading.Thread(target=self._server.serve_forever, name="worker-link", daemon=True).start()
        log.info("worker %d of %d: sessions of other workers are forwarded over %s", self.me.index,
                 self.me.count, self.me.run_dir)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def forward(self, owner: int, method: str, path: str, headers: list[tuple[str, str]],
                body: bytes) -> Forwarded:
        """Send the request to worker `owner`; ConnectionError when that worker is not listening."""
        if not 0 <= owner < self.me.count:
            raise ConnectionError(f"no worker {owner} in this server ({self.me.count} workers)")
        conn = _UnixConnection(self.me.socket_path(owner), self.timeout_s)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", "localhost")
            for k, v in headers:
                if k.lower() not in _HOP and k != FORWARDED_HEADER:
                    conn.putheader(k, v)
            conn.putheader(FORWARDED_HEADER, str(self.me.index))
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
        except OSError as e:
            conn.close()
            raise ConnectionError(f"worker {owner} is not reachable: {e}") from e
        out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP]

        def chunks() -> Iterator[bytes]:
            try:
                while True:
                    piece = resp.read1(65536)
                    if not piece:
                        return
                    yield piece
            finally:
                conn.close()

        return Forwarded(resp.status, out, chunks())
