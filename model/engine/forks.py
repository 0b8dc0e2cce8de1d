"""Forks (torch-free): one prefill, then `n` rows that each start from a copy of the prompt's state.

A fork group is n sequences of the same request. The first (the leader) carries the group: it waits in the
queue for all of them, is admitted with all of them at once (n slots and every KV block the n need reserved
together, or none), and prefills the prompt but its last token alone. At that point (the fork point,
prompt_len - 1 tokens in the state) every other row gets:
  KV      the leader's full blocks of those tokens *shared by reference* (refcounted, model/runtime/blocks.py:
          the rows only write positions past the fork point), and a copy of the partial last block, which the
          row then appends to: what a prefix-cache resume does (model/engine/prefix_cache.py);
  state   the leader's Mamba state (conv + SSM) copied into its own slot (Copier.fork,
          model/runtime/snapshots.py).
Then each of the n rows (the leader too) feeds the prompt's last token as its own one-token chunk and samples
its first token from its own generator (seed + i): the prompt costs prompt_len - 1 + n tokens, not n x prompt_len.
A leader resumed from a snapshot at the fork point forks at admission (no prefill but the rows' last tokens). The
leader snapshots the fork point (model/engine/prefix_hooks.py `forked`), so the same request again does.

Cancelling a row ends that row only. A leader cancelled before the fork point keeps prefilling for the rows
still waiting on it and ends once they forked; a group whose rows are all cancelled ends at once.
"""

from __future__ import annotations

from model.engine.sequence import Sequence
from model.runtime.blocks import SlotAllocator, blocks_needed
from model.types import Copier, EngineConfig, InvalidRequest


def fork_point(seq: Sequence) -> int:
    """Tokens the leader folds into its state before the rows fork: all of the prompt but its last token
    (each row feeds that one to get its own logits)."""
    return seq.prompt_len - 1


def group_blocks(leader: Sequence, block_size: int) -> tuple[int, int]:
    """(shared, extra): the leader's blocks each other row shares (the full blocks before the fork point), and
    the fresh blocks the other rows need together beyond the leader's own reservation."""
    shared = fork_point(leader) // block_size
    return shared, len(leader.forks) * (blocks_needed(leader.reserve_tokens, block_size) - shared)


def check_group(leader: Sequence, n: int, config: EngineConfig, allocator: SlotAllocator) -> None:
    """InvalidRequest (422) unless the group of n rows could ever be admitted: n slots, n queue places, and the
    KV blocks of all n (the shared ones once) in the pool."""
    if n < 1:
        raise InvalidRequest(f"n must be >= 1, got {n}", status=422)
    cap = min(config.max_concurrent_seqs, config.max_queued_requests)
    if n > cap:
        raise InvalidRequest(f"n={n} rows exceed this server's {cap} (MAX_CONCURRENT_SEQS / MAX_QUEUED_REQUESTS)",
                             status=422)
    shared, extra = group_blocks(leader, allocator.block_size)
    need = blocks_needed(leader.reserve_tokens, allocator.block_size) + extra
    if need > allocator.num_blocks:
        raise InvalidRequest(f"n={n} rows of {leader.reserve_tokens} tokens need {need} KV blocks; the pool has "
                             f"{allocator.num_blocks}: ask for fewer rows or fewer tokens", status=422)


def place_forks(leader: Sequence, allocator: SlotAllocator) -> list[Sequence]:
    """Reserve each waiting row's slot and blocks, sharing the leader's full blocks before the fork point (the
    caller checked that they fit); returns the rows, now running but not yet forked."""
    shared, _ = group_blocks(leader, allocator.block_size)
    table = allocator.block_table(leader.slot)[:shared]
    for row in leader.forks:
        row.slot = allocator.allocate(row.reserve_tokens, table)
    return list(leader.forks)


def fork(leader: Sequence, allocator: SlotAllocator, copier: Copier | None) -> None:
    """The leader's state holds the fork point: copy it into each row's slot (no copier: a runner without a
    state pool, e.g. a test fake, has nothing to copy); the rows are then ordinary sequences."""
    n = leader.num_computed
    src = allocator.block_table(leader.slot)
    leader.forked = True
    for row in leader.forks:
        row.forked = True
        if n and copier is not None:
            copier.fork(leader.slot, row.slot, src, allocator.block_table(row.slot), n)
        row.num_computed = n
        row.cached_tokens = leader.cached_tokens
        row.leader = None
    leader.forks = []
