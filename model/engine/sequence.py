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
                 namespace: str = DEFAULT_NAMESPACE) -> None:
        self.seq_id = next(_ids)
        self.request = request
        self.prompt_ids: list[int] = list(request.prompt_ids)
        self.output_ids: list[int] = []
        # Clipped by the engine to the context budget; the scheduler reserves prompt + this.
        self.max_new_tokens = request.params.max_new_tokens if max_new_tokens is None else max_new_tokens
        # The prefix cache's key space (model/engine/prefix_cache.py): snapshots are resumed only within it. Every request
        # has the default today; a LoRA adapter's id goes here (state under other weights is other state).
        self.namespace = namespace
        self.adapter = request.adapter  # its LoRA adapter (held by the engine from submit to the end), or None
        self.slot: int | None = None
        self.num_computed = 0  # tokens already folded into the slot's state (= KV length)
        self.status = SeqStatus.WAITING
        self.cancelled = False  # set from any thread; acted on by the next schedule()
        self.last_served = -1  # when this sequence last got a decode token (fairness order)
        self.scheduled_tokens = 0  # tokens fed in the step being run
        self.cached_tokens = 0  # prompt tokens resumed from a prefix-cache snapshot (not computed)
        self.finish_reason: FinishReason | None = None  # set by the scheduler's finish rule on its last token
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
    return Sequence(request, max_new_tokens=min(p.max_new_tokens, budget - n))
