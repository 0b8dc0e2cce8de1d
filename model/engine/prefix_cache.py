"""Torch-free prefix cache: snapshots of sequence state keyed by (namespace, the exact token ids they consumed).

A snapshot after n tokens = that sequence's Mamba state (conv + SSM of every Mamba layer, a fixed size
whatever n) + the KV of its n tokens. The Mamba state is the whole history, so a new prompt that starts
with those n ids resumes from the snapshot and prefills only the rest, exactly.

Tiers (the tensor side, `Copier` in model/types.py, lives in model/runtime/snapshots.py):
  device  state copied out of the slot; KV *shared by reference*: the snapshot holds ceil(n / block)
          KV blocks (refcounted in model/runtime/blocks.py). A resumed sequence shares the n // block full blocks
          and gets a fresh copy of the partial last block, which it then appends to.
  host    state + KV of the n tokens packed in one (pinned) host buffer; no device memory held. A resume
          copies it back in one transfer into a fresh slot and fresh blocks.
Budgets: device bytes = state copies + the distinct KV blocks device snapshots hold; host bytes = buffers.
Over the device budget the least recently used snapshot moves to the host tier; over the host budget the
least recently used one is dropped (an eviction). Admission never waits for a snapshot: when a new
sequence needs KV blocks that snapshots hold, they move to the host tier (or are dropped) first.

Sessions: a snapshot pinned for a session (pin_session) is never dropped while pinned; it may still move
to the host tier (which may then exceed its budget: the server bounds sessions in number).

Namespaces: a snapshot is only ever resumed by a sequence of its own namespace (each has its own trie). Today's
requests all have DEFAULT_NAMESPACE; a LoRA adapter's id goes there, since state computed under other weights is
not the same state for the same ids.

Matching: the longest snapshot whose ids are a *strict* prefix of the prompt (n <= len(prompt) - 1): the
resumed sequence must feed >= 1 token, because sampling needs the logits of the prompt's last token and
a snapshot's state already contains its last token (it cannot be fed twice).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from model.engine.token_trie import TokenTrie
from model.runtime.blocks import SlotAllocator, blocks_needed
from model.types import Copier, EngineConfig, Runner

DEVICE, HOST = "device", "host"
DEFAULT_NAMESPACE = ""  # the key space of requests on the base weights (no adapter)
log = logging.getLogger(__name__)


@dataclass(eq=False)
class Snapshot:
    ids: tuple[int, ...]  # the exact tokens folded into the state
    tier: str
    data: Any  # the Copier's storage for this tier
    blocks: tuple[int, ...] = ()  # device tier: KV blocks of the n tokens (held)
    nbytes: int = 0  # host tier: buffer bytes
    pins: set[str] = field(default_factory=set)
    namespace: str = DEFAULT_NAMESPACE  # shared only within it


class PrefixCache:
    def __init__(self, allocator: SlotAllocator, copier: Copier, device_bytes: int, host_bytes: int) -> None:
        self.allocator, self.copier = allocator, copier
        self.bs = allocator.block_size
        self.device_budget, self.host_budget = max(device_bytes, 0), max(host_bytes, 0)
        self.trie = TokenTrie()  # DEFAULT_NAMESPACE's index
        self._tries: dict[str, TokenTrie] = {DEFAULT_NAMESPACE: self.trie}  # namespace -> its own index
        self.lru: OrderedDict[int, Snapshot] = OrderedDict()  # id(snap) -> snap, least recent first
        self._dev_blocks: dict[int, int] = {}  # block -> device snapshots holding it
        self._host_used = 0
        self._dev_count = 0  # snapshots in the device tier
        self._sessions: dict[str, tuple[Snapshot, tuple[int, ...]]] = {}  # id -> (pinned snap, conversation)
        self.counters = dict(hits=0, hits_host=0, misses=0, evictions=0, demotions=0, snapshots_taken=0,
                             tokens_reused=0)

    # ---- accounting ----------------------------------------------------------------------------
    @property
    def device_used(self) -> int:
        return self._dev_count * self.copier.state_bytes + len(self._dev_blocks) * self.copier.kv_block_bytes

    @property
    def host_used(self) -> int:
        return self._host_used

    def stats(self) -> dict:
        tiers = [s.tier for s in self.lru.values()]
        return dict(self.counters, snapshots_device=tiers.count(DEVICE), snapshots_host=tiers.count(HOST),
                    bytes_device=self.device_used, bytes_host=self._host_used,
                    budget_device_bytes=self.device_budget, budget_host_bytes=self.host_budget,
                    kv_blocks_held=len(self._dev_blocks), sessions=len(self._sessions))

    # ---- admission (the scheduler's hook) ---------------------------------------------------------
    def admit(self, prompt_ids, reserve_tokens: int, namespace: str = DEFAULT_NAMESPACE, extra_slots: int = 0,
              extra_blocks: int = 0) -> tuple[int, int] | None:
        """Allocate a slot for a new sequence, resumed from the longest matching snapshot when there is
        one: returns (slot, tokens already in its state), or None when it cannot be admitted yet (no slot,
        or running sequences hold the KV it needs). Snapshots give up their blocks before that. `extra_slots`,
        `extra_blocks`: what a fork group's other rows need beside it (model/engine/forks.py), left free too."""
        if self.allocator.num_free_slots < 1 + extra_slots:
            return None
        trie = self._tries.get(namespace)
        hit = trie.longest(prompt_ids, len(prompt_ids) - 1) if trie is not None else None
        while True:
            shared = list(hit.blocks[: len(hit.ids) // self.bs]) if hit and hit.tier == DEVICE else []
            need = blocks_needed(reserve_tokens, self.bs) - len(shared) + extra_blocks
            if need <= self.allocator.num_free_blocks:
                break
            victim = next((s for s in self.lru.values() if s.tier == DEVICE and s is not hit), None)
            if victim is None and hit is not None and hit.tier == DEVICE:
                victim = hit  # its own blocks are in the way: resume it from the host tier instead
            if victim is None:
                return None  # running sequences hold the blocks: wait, as without snapshots
            self._demote(victim, protect=hit)
            if hit is victim and hit.tier != HOST:
                hit = None  # dropped
        slot = self.allocator.allocate(reserve_tokens, shared)
        if hit is None:
            self.counters["misses"] += 1
            return slot, 0
        n, table = len(hit.ids), self.allocator.block_table(slot)
        try:
            if hit.tier == DEVICE:
                self.copier.restore_device(hit.data, slot, list(hit.blocks), table, n)
            else:
                self.copier.restore_host(hit.data, slot, table, n)
        except Exception:  # e.g. no device memory to stage a host snapshot: forget it, admit without it
            log.exception("prefix cache: restoring a snapshot of %d tokens failed; dropped", n)
            self.allocator.free(slot)
            self._drop(hit, evicted=True)
            return self.admit(prompt_ids, reserve_tokens, namespace, extra_slots, extra_blocks)
        self.lru.move_to_end(id(hit))
        self.counters["hits"] += 1
        self.counters["hits_host"] += hit.tier == HOST
        self.counters["tokens_reused"] += n
        return slot, n

    # ---- taking snapshots (the engine's hooks) ------------------------------------------------------
    def take(self, slot: int, ids, session: str | None = None, conversation=None,
             supersedes=None, namespace: str = DEFAULT_NAMESPACE) -> Snapshot | None:
        """Snapshot the slot's state after exactly `ids` (its first len(ids) KV positions). With `session`,
        pin it for that session (replacing the session's previous pin) and remember `conversation`.
        `supersedes`: the ids of this sequence's earlier (prompt-end) snapshot, which the new one extends:
        it becomes the least recently used, first to leave the device."""
        ids = tuple(ids)
        if not ids:
            return None
        trie = self._tries.setdefault(namespace, TokenTrie())
        older = trie.get(tuple(supersedes)) if supersedes is not None else None
        if older is not None and len(older.ids) < len(ids):
            self.lru.move_to_end(id(older), last=False)
        snap = trie.get(ids)
        if snap is None:
            blocks = tuple(self.allocator.block_table(slot)[: blocks_needed(len(ids), self.bs)])
            snap = Snapshot(ids, DEVICE, self.copier.save(slot), blocks, namespace=namespace)
            self.allocator.retain(blocks)
            for b in blocks:
                self._dev_blocks[b] = self._dev_blocks.get(b, 0) + 1
            trie.put(snap)
            self.lru[id(snap)] = snap
            self._dev_count += 1
            self.counters["snapshots_taken"] += 1
        self.lru.move_to_end(id(snap))
        if session is not None:
            self.pin_session(session, snap, tuple(conversation) if conversation is not None else ids)
        self._fit()
        return snap if id(snap) in self.lru else None

    def _fit(self) -> None:
        """Enforce the budgets: device LRU -> host, host LRU (unpinned) -> dropped."""
        while self.device_used > self.device_budget:
            victim = next((s for s in self.lru.values() if s.tier == DEVICE), None)
            if victim is None:
                break
            self._demote(victim)
        while self._host_used > self.host_budget:
            victim = self._host_victim()
            if victim is None:
                break
            self._drop(victim, evicted=True)

    def _host_victim(self, protect: Snapshot | None = None) -> Snapshot | None:
        return next((s for s in self.lru.values() if s.tier == HOST and not s.pins and s is not protect), None)

    def _demote(self, snap: Snapshot, protect: Snapshot | None = None) -> None:
        """Device -> host (one packed buffer), or dropped when the host tier cannot take it. `protect`: a
        host snapshot about to be restored, never dropped to make room."""
        n = len(snap.ids)
        size = self.copier.host_bytes(n)
        while self._host_used + size > self.host_budget and size <= self.host_budget:
            victim = self._host_victim(protect)  # room by dropping older unpinned host snapshots
            if victim is None:
                break
            self._drop(victim, evicted=True)
        if self._host_used + size > self.host_budget and not snap.pins:
            self._drop(snap, evicted=True)
            return
        try:
            packed = self.copier.to_host(snap.data, list(snap.blocks), n)
        except Exception:  # e.g. no memory to stage or pin the buffer: the snapshot is dropped instead
            log.exception("prefix cache: moving a snapshot of %d tokens to the host failed; dropped", n)
            self._drop(snap, evicted=True)
            return
        self._release_blocks(snap)
        self._dev_count -= 1
        snap.tier, snap.data, snap.nbytes = HOST, packed, size
        self._host_used += size
        self.counters["demotions"] += 1

    def _release_blocks(self, snap: Snapshot) -> None:
        for b in snap.blocks:
            left = self._dev_blocks[b] - 1
            if left:
                self._dev_blocks[b] = left
            else:
                del self._dev_blocks[b]
        self.allocator.release(snap.blocks)
        snap.blocks = ()

    def _drop(self, snap: Snapshot, evicted: bool) -> None:
        if snap.tier == DEVICE:
            self._release_blocks(snap)
            self._dev_count -= 1
        else:
            self._host_used -= snap.nbytes
        trie = self._tries[snap.namespace]
        trie.remove(snap.ids)
        if snap.namespace != DEFAULT_NAMESPACE and not trie.root.children:
            del self._tries[snap.namespace]  # its last snapshot
        del self.lru[id(snap)]
        snap.data = None
        if evicted:
            self.counters["evictions"] += 1

    def clear(self) -> int:
        """Drop every unpinned snapshot (not counted as evictions); returns how many."""
        victims = [s for s in self.lru.values() if not s.pins]
        for s in victims:
            self._drop(s, evicted=False)
        return len(victims)

    # ---- sessions -------------------------------------------------------------------------------
    def pin_session(self, session: str, snap: Snapshot, conversation: tuple[int, ...]) -> None:
        old = self._sessions.get(session)
        snap.pins.add(session)
        self._sessions[session] = (snap, conversation)
        if old is not None and old[0] is not snap:
            old[0].pins.discard(session)

    def release_session(self, session: str) -> bool:
        """Unpin the session's snapshot (it stays cached, evictable); False for an unknown session."""
        old = self._sessions.pop(session, None)
        if old is None:
            return False
        old[0].pins.discard(session)
        self._fit()
        return True

    def conversation(self, session: str) -> tuple[int, ...] | None:
        """Every token id of the session's conversation so far (the last turn's output included)."""
        got = self._sessions.get(session)
        return got[1] if got else None


def for_runner(config: EngineConfig, runner: Runner) -> PrefixCache | None:
    """The engine's prefix cache, or None (disabled, or a runner without a state pool, e.g. a test fake)."""
    copier = runner.snapshot_copier
    if not config.prefix_cache or copier is None:
        return None
    rep = runner.memory_report()
    device = int(config.snapshot_device_share * (rep["pool_state_bytes"] + rep["pool_kv_bytes"]))
    return PrefixCache(runner.allocator, copier, device, config.snapshot_host_bytes)
