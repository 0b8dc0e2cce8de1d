"""LoRA adapters, the SageMaker inference-component way (torch-free): the routes' registry and a request's choice.

Routes (serve/routes.py):
  POST   /adapters          {"name", "src", "preload"} as a JSON body or as query parameters: register
  DELETE /adapters/<name>   remove: new requests for it get 404, running ones finish, then its memory is freed
  GET    /adapters          the registered adapters
A request picks an adapter by the header X-Amzn-SageMaker-Adapter-Identifier (or -Alias), TGI
`parameters.adapter_id`, or an OpenAI `model` naming a registered adapter (another `model` value means the base);
JSON Lines and batch records the same, each record on its own. Unknown: 404 naming it.

Several gunicorn workers (one engine each): a registration must reach every worker. The choice here is a shared
on-disk registry, one small JSON file per adapter (name, resolved local folder) in a folder the gunicorn master
makes fresh at start (ADAPTER_REGISTRY_DIR, exported to the workers): the worker that gets the POST checks and
loads the adapter itself (so a bad adapter is a 400 on the POST), then publishes the file (O_EXCL: a second
registration of the name, on any worker, is a 409); DELETE removes the file. Every worker syncs its engine
with the folder before any adapter request and GET /adapters (one listing of the folder when nothing changed),
registering what it lacks and removing what is gone. Fan-out over HTTP was the alternative; the folder needs no
worker to be reachable and also serves start-up discovery (/opt/ml/model/adapters/<name>/ and ADAPTERS).

Provenance: under MODEL_SIGNATURE=require (or verify with a bundle present) the adapter folder's own model.sig
is verified with the base's method before the engine reads any tensor (model/checkpoint/signing.py).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from model.checkpoint.signing import SignatureError, SignaturePolicy, verify_checkpoint
from model.types import ADAPTER_NAME_RE, AdapterExists, AdapterInvalid, AdapterNotFound
from serve import adapter_src
from serve.config import AdapterConfig
from serve.protocol import ProtocolError
from serve.sessions import current_turn

log = logging.getLogger("serve.adapters")
ADAPTER_HEADER = "X-Amzn-SageMaker-Adapter-Identifier"
ALIAS_HEADER = "X-Amzn-SageMaker-Adapter-Alias"


class AdapterRegistry:
    """One worker's side of the shared registry (see the module doc)."""

    def __init__(self, config: AdapterConfig, signature: SignaturePolicy) -> None:
        self.config, self.signature = config, signature
        self.dir = Path(config.registry_dir) if config.registry_dir else None
        self._lock = threading.RLock()
        self._seen: frozenset | None = None  # the folder's (file name, inode) pairs at the last sync

    # ---- routes ----
    def register(self, engine, name: Any, src: Any) -> dict:
        if not isinstance(name, str) or not name:
            raise AdapterInvalid("the adapter needs a non-empty string 'name'")
        if not isinstance(src, str) or not src:
            raise AdapterInvalid(f"adapter {name!r} needs a non-empty string 'src'")
        if not ADAPTER_NAME_RE.match(name):
            raise AdapterInvalid(f"adapter name {name[:80]!r} is not valid: 1-64 letters, digits, '.', '_' or '-', "
                                 "starting with a letter or digit")
        with self._lock:
            self.sync(engine)
            if any(a["name"] == name for a in engine.list_adapters()) or self._entry(name).exists():
                raise AdapterExists(f"adapter {name!r} is already registered")
            path = adapter_src.resolve(src, name, self.config.roots, self.config.cache_dir)
            self._verify(name, path)
            info = engine.register_adapter(name, str(path))
            try:
                self._publish(name, path, src)
            except FileExistsError:  # another worker registered it meanwhile
                engine.unregister_adapter(name)
                raise AdapterExists(f"adapter {name!r} is already registered") from None
            self._seen = None
        return info

    def unregister(self, engine, name: str) -> None:
        with self._lock:
            self.sync(engine)
            entry = self._entry(name)
            if self.dir is not None and entry.exists():
                entry.unlink(missing_ok=True)
            engine.unregister_adapter(name)  # AdapterNotFound when it is not registered here either
            self._seen = None

    def list(self, engine) -> list[dict]:
        self.sync(engine)
        return engine.list_adapters()

    # ---- the shared folder ----
    def _entry(self, name: str) -> Path:
        return (self.dir or Path("/nonexistent")) / f"{name}.json"

    def _publish(self, name: str, path: Path, src: str) -> None:
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        # written apart, then linked in under its name: a reader never sees half a file, and the link fails
        # (FileExistsError) when another worker published the name first
        tmp = self.dir / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_text(json.dumps({"name": name, "path": str(path), "src": src}))
        try:
            os.link(tmp, self._entry(name))
        finally:
            tmp.unlink(missing_ok=True)

    def sync(self, engine) -> None:
        """Make this worker's engine hold exactly the adapters of the shared folder."""
        if self.dir is None or not self.dir.is_dir() or not engine.ready:
            return
        with self._lock:
            # the listing itself, not the folder's mtime: two registrations within one clock tick leave the
            # mtime unchanged; a file made again under the same name gets another inode
            with os.scandir(self.dir) as it:
                seen = frozenset((e.name, e.inode()) for e in it if e.name.endswith(".json"))
            if seen == self._seen:
                return
            want = {}
            for f in self.dir.glob("*.json"):
                try:
                    e = json.loads(f.read_text())
                    want[e["name"]] = e["path"]
                except (OSError, ValueError, KeyError):
                    continue  # being written, or removed meanwhile
            have = {a["name"] for a in engine.list_adapters()}
            for name in have - set(want):
                try:
                    engine.unregister_adapter(name)
                except AdapterNotFound:
                    pass
            for name in set(want) - have:
                try:
                    self._verify(name, Path(want[name]))
                    engine.register_adapter(name, want[name])
                except (AdapterInvalid, AdapterExists) as e:
                    log.error("adapter %s from the shared registry not loaded here: %s", name, e)
            self._seen = seen

    def _verify(self, name: str, path: Path) -> None:
        pol = self.signature
        if pol.mode == "off":
            return
        try:
            verify_checkpoint(path, replace(pol, file=Path(pol.file).name))
        except SignatureError as e:
            raise AdapterInvalid(f"adapter {name!r}: {e}") from None

    # ---- start-up ----
    def discover(self, engine) -> list[str]:
        """Register /opt/ml/model/adapters/<name>/ and ADAPTERS (each worker; the first one publishes)."""
        found: list[tuple[str, str]] = []
        d = Path(self.config.discover_dir) if self.config.discover_dir else None
        if d is not None and d.is_dir():
            found += [(p.name, str(p)) for p in sorted(d.iterdir()) if p.is_dir() or p.name.endswith(".tar.gz")]
        found += list(self.config.sources)
        done = []
        for name, src in found:
            name = name.removesuffix(".tar.gz")
            try:
                self.register(engine, name, src)
                done.append(name)
            except AdapterExists:
                done.append(name)
            except (AdapterInvalid, AdapterNotFound) as e:
                log.error("adapter %s (%s) not registered at start: %s", name, src, e.message)
        return done


# ---- a request's adapter ----

@dataclass(frozen=True)
class Selection:
    registry: AdapterRegistry | None
    header: str | None


_current: ContextVar[Selection | None] = ContextVar("adapter_selection", default=None)


@contextmanager
def selected(registry: AdapterRegistry | None, headers):
    """Around a request: its adapter header (Identifier, else Alias) and this worker's registry."""
    header = headers.get(ADAPTER_HEADER) or headers.get(ALIAS_HEADER) or None
    token = _current.set(Selection(registry, header.strip() if header else None))
    try:
        yield
    finally:
        _current.reset(token)


def choose(engine, req) -> str | None:
    """The adapter a parsed request runs on: the header, else TGI adapter_id, else an OpenAI `model` that names a
    registered adapter; None: the base. Inside a session, the session's (its first turn decides)."""
    sel = _current.get()
    header = sel.header if sel is not None else None
    explicit = getattr(req, "adapter_id", None)
    model = getattr(req, "model", None)
    if header and explicit and header != explicit:
        raise ProtocolError(400, f"the adapter header names {header!r} but parameters.adapter_id {explicit!r}",
                            "invalid_request")
    name = header or explicit
    if name or model:
        if sel is not None and sel.registry is not None:
            sel.registry.sync(engine)
        if not name and model in {a["name"] for a in engine.list_adapters()}:
            name = model
    turn = current_turn()
    if turn is not None:
        s = turn.session
        if s.turns == 0 and s.adapter is None:
            s.adapter = name
        elif name is not None and name != s.adapter:
            raise ProtocolError(400, f"session {s.id} runs on adapter {s.adapter!r}, not {name!r}", "invalid_request")
        name = s.adapter
    return name  # unknown: engine.submit answers 404 naming it
