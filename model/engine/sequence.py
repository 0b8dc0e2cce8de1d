"""One sequence's bookkeeping, torch-free (nano-vllm's Sequence): the scheduler moves it between its queues,
the prefix cache snapshots its slot, the engine hangs its handle and text state on `ctx`."""

from __future__ import annotations

import itertools
from enum import Enum
from typing import Any

from model.engine.prefix_cache import DEFAULT_NAMESPACE
from model.types import EngineConfig, FinishReason, GenerationRequest, InputTooLong, InvalidRequest


class SeqStatus(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    def __init__(self, request: GenerationRequest, max_new_tokens: int | None = None,
                 namespace: str = DEFAULT_NAMESPACE, boundaries: tuple[int, ...] = (),
                 interval_points: frozenset[int] = frozenset()) -> None:
        self.seq_id = next(_ids)
        self.request = request
        self.prompt_ids: list[int] = list(request.prompt_ids)
        self.output_ids: list[int] = []
        # Clipped by the engine to the context budget; the scheduler reserves prompt + this.
        self.max_new_tokens = request.params.max_new_tokens if max_new_tokens is None else max_new_tokens
        # The prefix cache's key space (model/engine/prefix_cache.py): snapshots are resumed only within it. Every request
        # has the default today; a LoRA adapter's id goes here (state under other weights is other state).
        self.namespace = namespace
        # Prompt positions a prefill chunk ends at, so the state there can be snapshotted (sorted, 0 < p < prompt_len;
        # snapshot_points below); at admission the scheduler adds those interval_points whose prefix was seen before.
        self.boundaries = boundaries
        self.interval_points = interval_points
        self.adapter = request.adapter  # its LoRA adapter (held by the engine from submit to the end), or None
        self.slot: int | None = None
        self.num_computed = 0  # tokens already folded into the slot's state (= KV length)
        self.status = SeqStatus.WAITING
        self.cancelled = False  # set from any thread; acted on by the next schedule()
        self.last_served = -1  # when this sequence last got a decode token (fairness order)
        self.scheduled_tokens = 0  # tokens fed in the step being run
        self.cached_tokens = 0  # prompt tokens resumed from a prefix-cache snapshot (not computed)
        self.finish_reason: FinishReason | None = None  # set by the scheduler's finish rule on its last token
        # A fork group (model/engine/forks.py): the leader's rows not yet forked, and a row's leader until then.
        self.forks: list[Sequence] = []
        self.leader: Sequence | None = None
        self.forked = False  # started from a fork point (a group's leader or row): no prompt snapshot of its own
        self.ctx: Any = None  # engine-owned per-sequence state (model/engine/handle.py SeqOutput)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def ids(self) -> list[int]:
        """Prompt + output ids."""
        return self.prompt_ids + self.output_ids

    @property
    def reserve_tokens(self) -> int:
        return self.prompt_len + self.max_new_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < self.prompt_len

    def next_boundary(self) -> int | None:
        """The first snapshot boundary past the tokens already computed (None: none left)."""
        return next((p for p in self.boundaries if p > self.num_computed), None)

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, slot={self.slot}, status={self.status.value}, "
            f"prompt={self.prompt_len}, out={len(self.output_ids)}, computed={self.num_computed})"
        )


def checked(request: GenerationRequest, config: EngineConfig, max_tokens_per_seq: int, vocab_size: int) -> Sequence:
    """A request as a sequence, checked against the engine's limits (raises InvalidRequest, InputTooLong), its
    max_new_tokens clipped to the context budget: max_total_tokens, and never more than the KV pool can ever hold
    for one sequence (max_tokens_per_seq)."""
    ids, p = request.prompt_ids, request.params
    n = len(ids)
    if n == 0:
        raise InvalidRequest("the prompt is empty (0 tokens)")
    if n > config.max_input_tokens:
        raise InputTooLong(f"the prompt has {n} tokens; the limit is max_input_tokens={config.max_input_tokens}")
    budget = min(config.max_total_tokens, max_tokens_per_seq)
    if n >= budget:
        raise InputTooLong(f"the prompt has {n} tokens; at most {budget - 1} fit this server's context")
    if p.max_new_tokens < 1:
        raise InvalidRequest(f"max_new_tokens must be >= 1, got {p.max_new_tokens}")
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise InvalidRequest(f"prompt token ids must be in [0, {vocab_size})")
    return Sequence(request, max_new_tokens=min(p.max_new_tokens, budget - n), **snapshot_points(request, config))


def snapshot_points(request: GenerationRequest, config: EngineConfig) -> dict:
    """Where the prefill of this prompt stops for a snapshot, besides its end: the request's structural boundaries
    (GenerationRequest.snapshot_at) at least config.snapshot_boundary_tokens in; for a raw prompt (snapshot_at None)
    candidates every config.snapshot_interval_tokens (interval_points: kept at admission only for a prefix seen
    before, PrefixCache.seen_before, so one-off prompts leave no snapshots but their own)."""
    n = len(request.prompt_ids)
    if not config.prefix_cache:
        return {}
    if request.snapshot_at is not None:
        points = {p for p in request.snapshot_at if config.snapshot_boundary_tokens <= p < n and p > 0}
        return dict(boundaries=tuple(sorted(points)))
    step = config.snapshot_interval_tokens
    return dict(interval_points=frozenset(range(step, n, step))) if step > 0 else {}
