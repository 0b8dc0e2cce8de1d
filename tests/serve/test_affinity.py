"""Forwarding a request to the worker that owns its session, over that worker's unix socket."""

from __future__ import annotations

import pytest
from flask import Flask, Response, request

from serve.affinity import FORWARDED_HEADER, WorkerId, WorkerLink


def _app(name: str) -> Flask:
    app = Flask(name)

    @app.post("/invocations")
    def inv():
        if request.args.get("stream"):
            def gen():
                for i in range(3):
                    yield f"data:{i}\n\n".encode()
            return Response(gen(), content_type="text/event-stream", headers={"X-Who": name})
        body = request.get_data()
        assert request.environ["wsgi.input"].read(1 << 16) == b""  # reading past the body ends, never waits
        return Response(b"%s got %s from %s" % (name.encode(), body,
                                                request.headers.get(FORWARDED_HEADER, "-").encode()),
                        status=201, content_type="text/plain", headers={"X-Who": name})

    return app


@pytest.fixture
def links(tmp_path):
    ids = [WorkerId(i, 2, str(tmp_path)) for i in range(2)]
    out = [WorkerLink(w, _app(f"w{w.index}"), timeout_s=10) for w in ids]
    for link in out:
        link.start()
    yield out
    for link in out:
        link.stop()


def test_forward_passes_body_status_headers(links):
    f = links[0].forward(1, "POST", "/invocations", [("Content-Type", "text/plain"), ("X-Custom", "1")], b"hello")
    assert f.status == 201
    assert dict(f.headers)["X-Who"] == "w1"
    assert b"".join(f.body) == b"w1 got hello from 0"


def test_forward_streams_events(links):
    f = links[1].forward(0, "POST", "/invocations?stream=1", [], b"")
    assert dict(f.headers)["X-Who"] == "w0"
    assert b"".join(f.body) == b"data:0\n\ndata:1\n\ndata:2\n\n"


def test_unknown_or_dead_worker_is_a_connection_error(links, tmp_path):
    with pytest.raises(ConnectionError):
        links[0].forward(5, "POST", "/invocations", [], b"")
    links[1].stop()
    (tmp_path / "worker-1.sock").unlink()
    with pytest.raises(ConnectionError, match="worker 1"):
        links[0].forward(1, "POST", "/invocations", [], b"")
