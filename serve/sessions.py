"""SageMaker stateful sessions (InvokeEndpoint `SessionId`): this worker's session table. torch-free.

The runtime passes the session as a request header; the container answers with headers of its own:
  request   X-Amzn-SageMaker-Session-Id: NEW_SESSION | <id>
  response  X-Amzn-SageMaker-New-Session-Id: <id>; Expires=<UTC YYYY-MM-DDTHH:MM:SSZ>   (a session opened)
            X-Amzn-SageMaker-Closed-Session-Id: <id>                                   (a session closed)
Bodies `{"requestType": "NEW_SESSION"}` / `{"requestType": "CLOSE"}` open / close without generating (as the
DJL LMI container accepts); any other body with NEW_SESSION runs inside the new session.

A session keeps its conversation: the token ids it has consumed and produced, and for chat its messages, so a
client may send only the new turn. The engine keeps the matching state snapshot pinned while the session
lives (`on_end` releases it). Ids name the worker that holds the session (`w<worker>-<hex>`, botocore's pattern),
so a request that gunicorn hands to another worker can be forwarded to the owner (serve/affinity.py).
Idle sessions expire after `ttl_s` (refreshed by every request); their number is bounded. An unknown, closed or
expired id is an error naming the id, never a silent fresh start.

With a store (serve/session_store.py) every change is written through before it is answered, and a table built
on the same folder (a restarted worker with the same index) starts with those sessions: the live ones (their
expiry and the SESSION_MAX limit hold as before the restart) and the ended ones (still 410); a session whose
expiry passed while no worker ran is expired at load.
"""

from __future__ import annotations

import contextvars
import json
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from model.types import RequestError
from serve.engine_client import EngineClient, RequestHandle
from serve.protocol.toolcalls import parse_tool_calls
from serve.session_store import SessionStore

SESSION_HEADER = "X-Amzn-SageMaker-Session-Id"
NEW_SESSION_HEADER = "X-Amzn-SageMaker-New-Session-Id"
CLOSED_SESSION_HEADER = "X-Amzn-SageMaker-Closed-Session-Id"
NEW_SESSION = "NEW_SESSION"
ID_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")  # botocore's SessionId shape
MAX_ID_LEN = 256
_OWNER = re.compile(r"^w(\d{1,4})-[0-9a-f]{32}$")
_ENDED_MEMORY = 4096  # ids of ended sessions remembered, so their errors say "closed" / "expired"


class SessionError(RequestError):
    """A session id this worker cannot serve, or a session request it cannot take (status set per case)."""

    error_type = "session_error"

    def __init__(self, status: int, message: str, error_type: str) -> None:
        super().__init__(message, status, error_type)


@dataclass
class Session:
    id: str
    expires_at: float  # wall-clock seconds
    ids: tuple[int, ...] = ()  # the conversation's token ids so far: every prompt and generated token
    messages: list[dict[str, Any]] = field(default_factory=list)  # chat turns so far (assistant answers too)
    busy: bool = False  # a request of this session is running (one at a time)
    adapter: str | None = None  # the LoRA adapter its first turn ran on (serve/adapters.py choose): every turn's
    turns: int = 0


def expires_text(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def check_id(raw: str) -> str:
    """The header value as a session id, or NEW_SESSION; SessionError 400 when it cannot be one."""
    raw = raw.strip()
    if raw == NEW_SESSION:
        return raw
    if not raw or len(raw) > MAX_ID_LEN or not ID_PATTERN.match(raw):
        raise SessionError(400, f"malformed session id {raw[:64]!r}: at most {MAX_ID_LEN} letters, digits and "
                                "inner hyphens, or NEW_SESSION", "invalid_session")
    return raw


def owner_of(session_id: str) -> int | None:
    """The worker index a session id names, or None for an id this server never issues."""
    m = _OWNER.match(session_id)
    return int(m.group(1)) if m else None


class SessionTable:
    def __init__(self, worker: int, ttl_s: float, max_sessions: int,
                 on_end: Callable[[Session], None] | None = None, clock: Callable[[], float] = time.time,
                 on_change: Callable[[int], None] | None = None, store_dir: str | None = None) -> None:
        """on_end(session): a session closed or expired (release its state); on_change(n): n sessions open;
        store_dir: where the table is kept on disk (None: in memory only)."""
        self.worker, self.ttl_s, self.max_sessions = worker, ttl_s, max_sessions
        self._on_end = on_end or (lambda s: None)
        self._on_change = on_change or (lambda n: None)
        self._clock = clock
        self._lock = threading.Lock()
        self._live: dict[str, Session] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()  # id -> "closed" | "expired"
        self.counters = dict(opened=0, closed=0, expired=0, restored=0)
        self._store = SessionStore(store_dir, _ENDED_MEMORY) if store_dir else None
        if self._store is not None:
            self._load()

    def _load(self) -> None:
        live, ended = self._store.load()
        for rec in ended:
            self._ended[rec["id"]] = rec["ended"]
        for rec in live:
            if owner_of(rec["id"]) != self.worker:
                continue  # another worker's (a changed worker count): never served here
            s = Session(rec["id"], float(rec["expires_at"]), tuple(rec.get("ids", ())), list(rec.get("messages", ())),
                        turns=int(rec.get("turns", 0)))
            self._live[s.id] = s
            self.counters["restored"] += 1
        self._on_change(len(self._live))
        self.sweep()  # expired while no worker ran

    def _save(self, s: Session, ended: str | None = None) -> None:
        if self._store is None:
            return
        if ended:
            self._store.save({"id": s.id, "ended": ended})
        else:
            self._store.save({"id": s.id, "expires_at": s.expires_at, "ids": list(s.ids), "messages": s.messages,
                              "turns": s.turns})

    @property
    def durable(self) -> bool:
        """Sessions outlive this worker (kept on disk)."""
        return self._store is not None

    def ended_ids(self) -> list[str]:
        """Ids of the sessions known to have ended (closed or expired), the newest last."""
        with self._lock:
            return list(self._ended)

    def __len__(self) -> int:
        return len(self._live)

    def open(self) -> Session:
        self.sweep()
        with self._lock:
            if len(self._live) >= self.max_sessions:
                raise SessionError(429, f"this worker holds its maximum of {self.max_sessions} sessions "
                                        f"(SESSION_MAX); close one, or wait for idle ones to expire after "
                                        f"{self.ttl_s:g} s", "too_many_sessions")
            s = Session(f"w{self.worker}-{secrets.token_hex(16)}", self._clock() + self.ttl_s)
            self._live[s.id] = s
            self.counters["opened"] += 1
            self._on_change(len(self._live))
        self._save(s)
        return s

    def acquire(self, session_id: str) -> Session:
        """The live session for one request, marked busy until release(); its idle clock restarts."""
        self.sweep()
        with self._lock:
            s = self._live.get(session_id)
            if s is None:
                why = self._ended.get(session_id)
                if why is not None:
                    raise SessionError(410, f"session {session_id} is {why}; open a new one with "
                                            f"SessionId=NEW_SESSION", f"session_{why}")
                raise SessionError(404, f"unknown session {session_id}: this endpoint never opened it, or it "
                                        "was lost when its worker restarted", "session_not_found")
            if s.busy:
                raise SessionError(409, f"session {session_id} is already running a request; send its turns "
                                        "one at a time", "session_busy")
            s.busy = True
            s.expires_at = self._clock() + self.ttl_s
            return s

    def release(self, s: Session, ids: tuple[int, ...] | None = None,
                messages: list[dict[str, Any]] | None = None) -> None:
        """End a request of `s`; a completed turn passes the conversation as it now stands."""
        with self._lock:
            if ids is not None:
                s.ids, s.turns = tuple(ids), s.turns + 1
            if messages is not None:
                s.messages = list(messages)
            s.busy = False
            s.expires_at = self._clock() + self.ttl_s
        self._save(s)

    def close(self, session_id: str) -> Session:
        s = self.acquire(session_id)
        self._end(s, "closed")
        return s

    def sweep(self) -> list[Session]:
        """Remove idle sessions past their expiry (never one that is running a request)."""
        now = self._clock()
        with self._lock:
            gone = [s for s in self._live.values() if s.expires_at <= now and not s.busy]
        for s in gone:
            self._end(s, "expired")
        return gone

    def close_all(self) -> None:
        with self._lock:
            live = list(self._live.values())
        for s in live:
            self._end(s, "closed")

    def _end(self, s: Session, why: str) -> None:
        with self._lock:
            if self._live.pop(s.id, None) is None:
                return
            self._ended[s.id] = why
            while len(self._ended) > _ENDED_MEMORY:
                self._ended.popitem(last=False)
            self.counters[why] += 1
            self._on_change(len(self._live))
        self._save(s, ended=why)  # recorded before the CLOSE is answered; a restart keeps it ended
        self._on_end(s)


# ---- one request inside a session (read by serve/generate.py while it tokenizes and submits) ----

_current: contextvars.ContextVar[Turn | None] = contextvars.ContextVar("granite_session_turn", default=None)
_FINISHED_OK = ("length", "eos_token", "stop_sequence")


class Turn:
    """What a request inside a session adds to the conversation. generate.py asks it for the prompt:
    `chat_messages` (the session's messages + the new ones) or `continue_ids` (the session's token ids + the
    new text's), and reports the one sequence it submits; `end()` records the turn in the session."""

    def __init__(self, session: Session, table: SessionTable, engine: EngineClient, fork: bool = False) -> None:
        self.session, self.table, self.engine = session, table, engine
        # a fork ("fork": true): runs from the session's state (its n rows too) and leaves the conversation as it was
        self.fork = fork
        self.messages: list[dict[str, Any]] | None = None  # the whole conversation this turn renders (chat)
        self.handle: RequestHandle | None = None
        self.prompt_ids: tuple[int, ...] = ()
        self._ended = False

    def chat_messages(self, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
        old = self.session.messages
        # a client that sends the whole history again (OpenAI style) is not appended twice: the session's own
        # answers (the generated text) equal the client's copies of them (parsed tool_calls) by what they say
        resent = len(new) > len(old) and all(_said(a) == _said(b) for a, b in zip(old, new, strict=False))
        self.messages = list(new) if resent else old + list(new)
        return self.messages

    def continue_ids(self, new: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.session.ids) + tuple(new)

    def submitted(self, handle: RequestHandle, prompt_ids: tuple[int, ...]) -> None:
        if self.handle is not None:
            raise SessionError(400, f"a turn of session {self.session.id} is one prompt: send a single input "
                                    "(not a list, not JSON Lines)", "invalid_session_request")
        self.handle, self.prompt_ids = handle, tuple(prompt_ids)

    def end(self) -> None:
        """The request is over (answered, streamed to the end, failed or cut): a turn that finished
        normally becomes part of the conversation; the session takes its next request either way."""
        if self._ended:
            return
        self._ended = True
        ids = messages = None
        h = None if self.fork else self.handle
        if h is not None and h.finished:
            c = h.result()
            if c.finish_reason.value in _FINISHED_OK:
                conv = self.engine.session_conversation(self.session.id)
                ids = tuple(conv) if conv else self.prompt_ids + tuple(c.token_ids)
                if self.messages is not None:
                    messages = [*self.messages, {"role": "assistant", "content": c.text}]
        self.table.release(self.session, ids, messages)


def _said(msg: dict[str, Any]) -> tuple:
    """What a message says, whichever way it is written: an assistant's tool calls as (name, arguments object)
    from its `tool_calls` (arguments an object or JSON text) or from `<tool_call>` markup in its content."""
    if msg.get("role") != "assistant":
        return tuple(sorted((k, repr(v)) for k, v in msg.items()))
    content = msg.get("content") or ""
    content, parsed, _ = parse_tool_calls(content) if isinstance(content, str) else (repr(content), [], True)
    calls = []
    for call in [*(msg.get("tool_calls") or []), *parsed]:
        fn = call.get("function", call) if isinstance(call, dict) else {}
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                pass
        calls.append((fn.get("name"), json.dumps(args, sort_keys=True)))
    return "assistant", content.strip(), tuple(calls)


def current_turn() -> Turn | None:
    return _current.get()


def bind_turn(turn: Turn | None):
    return _current.set(turn)


def unbind_turn(token) -> None:
    _current.reset(token)
