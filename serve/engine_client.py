"""The serve -> engine seam, typed: everything serve/ may call on the engine (EngineClient), on the handle
of one submitted sequence (RequestHandle) and on the engine's tokenizer (PromptTokenizer). torch-free.

The consumer names what it needs, as the engine does for its runner (model/types.py `Runner`): these live
beside the server, and model/engine/engine.py's Engine satisfies them structurally without importing serve/.
tests/serve/test_engine_client.py holds the real classes and the test fakes to every member, signatures
included, so neither the engine nor a fake can drift from what the server calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from model.types import Completion, EngineConfig, GenerationRequest, TokenEvent


@runtime_checkable
class PromptTokenizer(Protocol):
    """What serve/ needs to turn a request into prompt ids (model/text/tokenizer.py's Tokenizer)."""

    def encode(self, text: str) -> list[int]: ...
    def render_chat(self, messages, tools=None, documents=None) -> str: ...  # the checkpoint's chat template


@runtime_checkable
class RequestHandle(Protocol):
    """One submitted sequence (model/engine/handle.py's Handle): its events, once, in order; or its Completion."""

    prompt_tokens: int
    cached_tokens: int  # prompt tokens resumed from a state snapshot; set before the first event

    @property
    def finished(self) -> bool: ...  # the last event has been read
    def __iter__(self) -> Iterator[TokenEvent]: ...
    def cancel(self) -> None: ...  # any thread, idempotent: the engine frees the slot at its next step
    def result(self) -> Completion: ...  # reads the remaining events


@runtime_checkable
class EngineClient(Protocol):
    """What serve/ may call on the engine (model/engine/engine.py's Engine)."""

    model_name: str  # reported in responses (`model`) and /v1/models
    model_dir: Path  # the resolved checkpoint (code/inference.py may sit beside it)
    config: EngineConfig  # its limits as the engine applies them (max_total_tokens -> request Limits)
    error: str | None  # why loading failed (/ping says it with 503)

    @property
    def ready(self) -> bool: ...  # loaded and admitting requests
    @property
    def tokenizer(self) -> PromptTokenizer | None: ...  # None until loaded

    # lifecycle (the server's loader thread, SIGTERM, the batch CLI)
    def start(self) -> None: ...  # load in the background; idempotent
    def wait_ready(self, timeout: float | None = None) -> bool: ...
    def shutdown(self, timeout: float = 25.0) -> None: ...  # stop admitting, drain, end the rest

    # requests
    def submit(self, request: GenerationRequest) -> RequestHandle: ...  # QueueFull, InputTooLong, EngineNotReady
    # n rows of one request forked from one prefill (model/engine/forks.py), row i seeded seed + i; all or nothing
    def submit_n(self, request: GenerationRequest, n: int) -> list[RequestHandle]: ...
    def stats(self) -> dict[str, Any]: ...  # counters and gauges for /metrics and /execution-parameters

    # stateful sessions (serve/sessions.py): the engine keeps each session's snapshot pinned
    def session_conversation(self, session_id: str) -> tuple[int, ...] | None: ...
    def release_session(self, session_id: str) -> bool: ...

    # LoRA adapters (serve/adapters.py): AdapterInvalid 400, AdapterExists 409, AdapterNotFound 404
    def register_adapter(self, name: str, path: str) -> dict: ...
    def unregister_adapter(self, name: str) -> None: ...
    def list_adapters(self) -> list[dict]: ...
