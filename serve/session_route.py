"""POST /invocations with X-Amzn-SageMaker-Session-Id (serve/sessions.py): open, close, or run a turn.

    NEW_SESSION + {"requestType": "NEW_SESSION"} (or an empty body)  -> 200 {"session_id", "expires"}
    NEW_SESSION + an ordinary request                                 -> that request, run in the new session
    <id> + {"requestType": "CLOSE"}                                   -> 200 {"closed_session_id"}
    <id> + an ordinary request                                        -> a turn of the session
    <id> + an ordinary request with "fork": true                      -> a fork: runs from the session's state
                                                                         (n > 1 too), the conversation unchanged
The new session's id comes back in X-Amzn-SageMaker-New-Session-Id (with its expiry), a closed one in
X-Amzn-SageMaker-Closed-Session-Id. With several workers, a request for another worker's session is
forwarded to it first (serve/affinity.py). A turn runs through the ordinary handler (code/inference.py hooks
included) with the session's Turn bound, which serve/generate.py reads while it builds the prompt.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response, request

from serve import encoders as enc
from serve.affinity import FORWARDED_HEADER, WorkerLink
from serve.engine_client import EngineClient
from serve.protocol import JSONL_TYPES, media_type
from serve.sessions import (
    CLOSED_SESSION_HEADER,
    NEW_SESSION,
    NEW_SESSION_HEADER,
    Session,
    SessionError,
    SessionTable,
    Turn,
    bind_turn,
    check_id,
    expires_text,
    owner_of,
    unbind_turn,
)


def _control(body: bytes) -> str | None:
    """The body's requestType (NEW_SESSION / CLOSE), or None for an ordinary request."""
    if not body.strip():
        return NEW_SESSION
    if b"requestType" not in body:
        return None
    try:
        obj = json.loads(body)
    except ValueError:
        return None  # the handler answers the malformed body
    kind = obj.get("requestType") if isinstance(obj, dict) else None
    if kind is not None and kind not in (NEW_SESSION, "CLOSE"):
        raise SessionError(400, f"requestType must be NEW_SESSION or CLOSE, got {str(kind)[:40]!r}",
                           "invalid_session_request")
    return kind


def _json(obj: dict, headers: dict[str, str]) -> Response:
    return Response(enc.json_body(obj), status=200, mimetype="application/json", headers=headers)


def _forward(link: WorkerLink, owner: int, body: bytes, durable: bool) -> Response:
    try:
        f = link.forward(owner, request.method, request.full_path.rstrip("?"), list(request.headers.items()), body)
    except ConnectionError as e:
        sid = request.headers.get("X-Amzn-SageMaker-Session-Id", "")
        if durable:  # its session is on disk: the worker gunicorn starts in its place finds it again
            raise SessionError(503, f"session {sid} lives on worker {owner}, which is restarting ({e}); the "
                                    "session is kept: retry shortly", "session_worker_restarting") from None
        raise SessionError(404, f"session {sid} lived on worker {owner}, which is gone ({e}); open a new "
                                "session", "session_not_found") from None
    return Response(f.body, status=f.status, headers=f.headers, direct_passthrough=True)


def invocation(raw_id: str, table: SessionTable, link: WorkerLink | None, engine: EngineClient,
               invoke: Callable[[bytes], tuple[Any, str]], respond: Callable[[Any, str], Response],
               forwarded: Callable[[], None] = lambda: None) -> Response:
    """`invoke(body)` runs the ordinary /invocations handler; `respond` turns its result into a Response;
    `forwarded()` counts a request passed on to another worker."""
    sid = check_id(raw_id)
    body = request.get_data(cache=False)
    if sid != NEW_SESSION:
        owner = owner_of(sid)
        if link is not None and owner is not None and owner != link.me.index and FORWARDED_HEADER not in request.headers:
            forwarded()
            return _forward(link, owner, body, table.durable)
    control = _control(body)
    body, fork = _fork(body) if control is None else (body, False)
    if sid == NEW_SESSION:
        if control == "CLOSE":
            raise SessionError(400, "CLOSE needs the id of the session to close, not NEW_SESSION",
                               "invalid_session_request")
        s = table.open()
        headers = {NEW_SESSION_HEADER: f"{s.id}; Expires={expires_text(s.expires_at)}"}
        if control == NEW_SESSION:
            return _json({"session_id": s.id, "expires": expires_text(s.expires_at)}, headers)
        return _turn(table.acquire(s.id), table, engine, body, invoke, respond, headers, fork)
    if control == NEW_SESSION:
        raise SessionError(400, f"session {sid} is open already: send NEW_SESSION as the session id to open "
                                "another", "invalid_session_request")
    if control == "CLOSE":
        table.close(sid)
        return _json({"closed_session_id": sid}, {CLOSED_SESSION_HEADER: sid})
    return _turn(table.acquire(sid), table, engine, body, invoke, respond, {}, fork)


def _fork(body: bytes) -> tuple[bytes, bool]:
    """The body without its session-only field "fork" (a boolean), and that field."""
    if b'"fork"' not in body:
        return body, False
    try:
        obj = json.loads(body)
    except ValueError:
        return body, False  # the handler answers the malformed body
    if not isinstance(obj, dict) or "fork" not in obj:
        return body, False
    fork = obj.pop("fork")
    if not isinstance(fork, bool):
        raise SessionError(422, f"fork must be true or false, got {json.dumps(fork)[:40]}", "validation")
    return json.dumps(obj).encode(), fork


def _turn(s: Session, table: SessionTable, engine: EngineClient, body: bytes, invoke, respond,
          headers: dict[str, str], fork: bool = False) -> Response:
    turn = Turn(s, table, engine, fork)
    try:
        if media_type(request.headers.get("Content-Type")) in JSONL_TYPES:
            raise SessionError(400, f"a turn of session {s.id} is one request: JSON Lines bodies are not "
                                    "taken inside a session", "invalid_session_request")
        token = bind_turn(turn)
        try:
            out, content_type = invoke(body)
        finally:
            unbind_turn(token)
    except BaseException:
        turn.end()
        raise
    if isinstance(out, (bytes, str)):
        turn.end()
        response = respond(out, content_type)
    else:
        response = respond(_ending(out, turn), content_type)
    response.headers.update(headers)
    return response


def _ending(body: Iterator[bytes], turn: Turn) -> Iterator[bytes]:
    # A streamed turn ends when its last event is sent (or its client goes away).
    try:
        yield from body
    finally:
        close = getattr(body, "close", None)
        if close:
            close()
        turn.end()
