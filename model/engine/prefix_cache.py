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
  disk    that buffer in a checked file (`SnapshotStore` in model/types.py: model/runtime/disk_tier.py); a resume
          reads it in one pass, then restores it as a host one. A file that fails its checks is discarded there:
          the snapshot is forgotten and the prompt resumes from a shorter one or is prefilled in full.
Budgets: device bytes = state copies + the distinct KV blocks device snapshots hold; host bytes = buffers; disk
bytes = files, accounted before they are written. Over the device budget the least recently used snapshot moves
to the host tier; over the host budget the least recently used one spills to disk; over the disk budget the least
recently used file is deleted (an eviction). Without a disk tier, host overflow is evicted. Admission never waits
for a snapshot: when a new sequence needs KV blocks that snapshots hold, they move to the host tier (or are
dropped) first.

Sessions: a snapshot pinned for a session (pin_session) is never dropped while pinned; it may still move
to the host tier (which may then exceed its budget: the server bounds sessions in number). With a disk tier it is
written through to disk with the session's pin (its conversation), so a restarted engine on the same directory
finds the session again (load_disk), and having a file it leaves memory like any other snapshot (no budget
exceeded). Pinned files are never evicted and count in the disk budget (a pin that does not fit is not persisted,
counted `sessions_not_persisted`). Releasing the session deletes them.

Namespaces: a snapshot is only ever resumed by a sequence of its own namespace (each has its own trie). Today's
requests all have DEFAULT_NAMESPACE; a LoRA adapter's id goes there, since state computed under other weights is
not the same state for the same ids.

Boundaries: besides a prompt's end, a snapshot is taken where a chat prompt's system part ends (structural) and,
for raw prompts, every EngineConfig.snapshot_interval_tokens once that prefix comes a second time (seen_before: a
bounded set of prefix hashes), so prompts seen once leave no snapshots but their own (model/engine/sequence.py
snapshot_points; the scheduler ends a prefill chunk there, the prefix hooks take it).

Matching: the longest snapshot whose ids are a *strict* prefix of the prompt (n <= len(prompt) - 1): the
resumed sequence must feed >= 1 token, because sampling needs the logits of the prompt's last token and
a snapshot's state already contains its last token (it cannot be fed twice).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from model.engine.prefix_disk import DEVICE, DISK, HOST, DiskTierPolicy
from model.engine.token_trie import TokenTrie
from model.runtime.blocks import SlotAllocator, blocks_needed
from model.types import Copier, EngineConfig, Runner, SnapshotStore

DEFAULT_NAMESPACE = ""  # the key space of requests on the base weights (no adapter)
SEEN_MAX = 8192  # prefix hashes remembered for seen_before (8 bytes of key each, LRU)
# Host bytes of the index per token of a cached snapshot, an upper bound: its `ids` tuple (an 8-byte reference and
# a 32-byte int object each) + the radix trie's 4-byte edge ids and its nodes (model/engine/token_trie.py); reported,
# not budgeted.
INDEX_BYTES_PER_TOKEN = 48
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
    hits: int = 0  # resumes from it (evicted at 0: the memory it took served no one)
    disk: str | None = None  # the key of its file in the disk tier (tier DISK, or a session's write-through)
    disk_bytes: int = 0


class PrefixCache(DiskTierPolicy):
    def __init__(self, allocator: SlotAllocator, copier: Copier, device_bytes: int, host_bytes: int,
                 store: SnapshotStore | None = None) -> None:
        self.allocator, self.copier, self.store = allocator, copier, store
        self.disk_budget = store.budget if store is not None else 0
        self._disk_used = 0
        self.bs = allocator.block_size
        self.device_budget, self.host_budget = max(device_bytes, 0), max(host_bytes, 0)
        self.trie = TokenTrie()  # DEFAULT_NAMESPACE's index
        self._tries: dict[str, TokenTrie] = {DEFAULT_NAMESPACE: self.trie}  # namespace -> its own index
        self.lru: OrderedDict[int, Snapshot] = OrderedDict()  # id(snap) -> snap, least recent first
        self._dev_blocks: dict[int, int] = {}  # block -> device snapshots holding it
        self._host_used = 0
        self._dev_count = 0  # snapshots in the device tier
        self._sessions: dict[str, tuple[Snapshot, tuple[int, ...]]] = {}  # id -> (pinned snap, conversation)
        self._seen: OrderedDict[int, None] = OrderedDict()  # seen_before's prefix hashes, least recent first
        self._index_tokens = 0  # ids of the cached snapshots (their keys)
        self.counters = dict(hits=0, hits_host=0, hits_disk=0, misses=0, evictions=0, demotions=0, spills=0,
                             snapshots_taken=0, snapshots_boundary=0, tokens_reused=0, evictions_unused=0,
                             sessions_not_persisted=0)

    # ---- accounting ----------------------------------------------------------------------------
    @property
    def device_used(self) -> int:
        return self._dev_count * self.copier.state_bytes + len(self._dev_blocks) * self.copier.kv_block_bytes

    @property
    def host_used(self) -> int:
        return self._host_used

    def stats(self) -> dict:
        tiers = [s.tier for s in self.lru.values()]
        out = dict(self.counters, snapshots_device=tiers.count(DEVICE), snapshots_host=tiers.count(HOST),
                   snapshots_disk=tiers.count(DISK), bytes_device=self.device_used, bytes_host=self._host_used,
                   bytes_disk=self._disk_used, budget_device_bytes=self.device_budget,
                   budget_host_bytes=self.host_budget, budget_disk_bytes=self.disk_budget,
                   kv_blocks_held=len(self._dev_blocks), sessions=len(self._sessions),
                   bytes_device_kv=len(self._dev_blocks) * self.copier.kv_block_bytes,  # of bytes_device: in the pool
                   bytes_index=self._index_tokens * INDEX_BYTES_PER_TOKEN,
                   index_nodes=sum(t.nodes for t in self._tries.values()))
        if self.store is not None:
            out.update(self.store.stats())
        return out

    def seen_before(self, ids, points, namespace: str = DEFAULT_NAMESPACE) -> list[int]:
        """Those of `points` (prompt positions) whose prefix ids[:p] was asked about before; the others are
        remembered (SEEN_MAX hashes, LRU). An interval snapshot is taken the second time a prefix comes."""
        out = []
        for p in sorted(points):
            key = hash((namespace, tuple(ids[:p])))
            if key in self._seen:
                self._seen.move_to_end(key)
                out.append(p)
            else:
                self._seen[key] = None
                if len(self._seen) > SEEN_MAX:
                    self._seen.popitem(last=False)
        return out

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
            if hit is not None and id(hit) not in self.lru:
                hit = None  # its file was deleted to make room for a spill
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
            elif hit.tier == HOST:
                self.copier.restore_host(hit.data, slot, table, n)
            else:
                data = self.store.read(hit.disk, hit.namespace, hit.ids)
                if data is None:  # missing, or discarded by its checks (counted there): forget it
                    self.allocator.free(slot)
                    self._drop(hit, evicted=False)
                    return self.admit(prompt_ids, reserve_tokens, namespace)
                self.copier.restore_host(self.copier.from_bytes(data, n), slot, table, n)
        except Exception:  # e.g. no device memory to stage a host snapshot: forget it, admit without it
            log.exception("prefix cache: restoring a snapshot of %d tokens failed; dropped", n)
            self.allocator.free(slot)
            self._drop(hit, evicted=True)
            return self.admit(prompt_ids, reserve_tokens, namespace, extra_slots, extra_blocks)
        self.lru.move_to_end(id(hit))
        hit.hits += 1
        self.counters["hits"] += 1
        self.counters["hits_host"] += hit.tier == HOST
        self.counters["hits_disk"] += hit.tier == DISK
        self.counters["tokens_reused"] += n
        return slot, n

    # ---- taking snapshots (the engine's hooks) ------------------------------------------------------
    def take(self, slot: int, ids, session: str | None = None, conversation=None,
             supersedes=None, namespace: str = DEFAULT_NAMESPACE, boundary: bool = False) -> Snapshot | None:
        """Snapshot the slot's state after exactly `ids` (its first len(ids) KV positions). With `session`,
        pin it for that session (replacing the session's previous pin) and remember `conversation`.
        `supersedes`: the ids of this sequence's earlier (prompt-end) snapshot, which the new one extends:
        it becomes the least recently used, first to leave the device. `boundary`: taken mid-prompt (counted)."""
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
            self._index_tokens += len(ids)
            self.counters["snapshots_taken"] += 1
            self.counters["snapshots_boundary"] += boundary
        self.lru.move_to_end(id(snap))
        if session is not None:
            self.pin_session(session, snap, tuple(conversation) if conversation is not None else ids)
            if older is not None and older.disk is None and self.store is not None and id(older) in self.lru:
                self._spill_copy(older)  # a chat turn re-renders the answer: the next resumes at this prompt's end
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
            self._spill(victim)

    def _host_victim(self, protect: Snapshot | None = None) -> Snapshot | None:
        # a pinned snapshot may leave memory once it has a file (a session's, written through)
        return next((s for s in self.lru.values()
                     if s.tier == HOST and (not s.pins or s.disk) and s is not protect), None)

    def _demote(self, snap: Snapshot, protect: Snapshot | None = None) -> None:
        """Device -> host (one packed buffer), or dropped when the host tier cannot take it. `protect`: a
        host snapshot about to be restored, never dropped to make room."""
        n = len(snap.ids)
        size = self.copier.host_bytes(n)
        while self._host_used + size > self.host_budget and size <= self.host_budget:
            victim = self._host_victim(protect)  # room by spilling older unpinned host snapshots
            if victim is None:
                break
            self._spill(victim)
        if self._host_used + size > self.host_budget and (not snap.pins or snap.disk):
            self._spill(snap)
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

    # ---- the disk tier (the rest of its policy: model/engine/prefix_disk.py) ---------------------------
    def load_disk(self) -> int:
        """At start: index the disk tier's files of this model (least recently written first) and re-pin the
        sessions found there; returns how many snapshots."""
        if self.store is None:
            return 0
        entries, pins = self.store.scan()
        pinned, room, keep = {key for key, _ in pins.values()}, self.disk_budget, set()
        for e in sorted(entries, key=lambda e: (e.key not in pinned, -e.mtime)):  # pinned, then the newest
            if e.size <= room:
                room -= e.size
                keep.add(e.key)
        for e in entries:
            if e.key not in keep:
                self.store.delete(e.key)  # over a (lowered) budget
                continue
            trie = self._tries.setdefault(e.namespace, TokenTrie())
            snap = Snapshot(e.ids, DISK, None, namespace=e.namespace, disk=e.key, disk_bytes=e.size)
            trie.put(snap)
            self.lru[id(snap)] = snap
            self._disk_used += e.size
        by_key = {s.disk: s for s in self.lru.values()}
        for session, (key, conversation) in pins.items():
            if key in by_key:
                self.pin_session(session, by_key[key], conversation, persist=False)
            else:
                self.store.delete_pin(session)
        return len(self.lru)

    def _drop(self, snap: Snapshot, evicted: bool) -> None:
        self._forget_file(snap)
        if snap.tier == DEVICE:
            self._release_blocks(snap)
            self._dev_count -= 1
        elif snap.tier == HOST:
            self._host_used -= snap.nbytes
        trie = self._tries[snap.namespace]
        trie.remove(snap.ids)
        self._index_tokens -= len(snap.ids)
        if snap.namespace != DEFAULT_NAMESPACE and not trie.root.children:
            del self._tries[snap.namespace]  # its last snapshot
        del self.lru[id(snap)]
        snap.data = None
        if evicted:
            self.counters["evictions"] += 1
            self.counters["evictions_unused"] += not snap.hits

    def clear(self) -> int:
        """Drop every unpinned snapshot (not counted as evictions); returns how many."""
        victims = [s for s in self.lru.values() if not s.pins]
        for s in victims:
            self._drop(s, evicted=False)
        return len(victims)

    # ---- sessions -------------------------------------------------------------------------------
    def pin_session(self, session: str, snap: Snapshot, conversation: tuple[int, ...], persist: bool = True) -> None:
        old = self._sessions.get(session)
        snap.pins.add(session)
        self._sessions[session] = (snap, conversation)
        if old is not None and old[0] is not snap:
            old[0].pins.discard(session)
        if persist and self.store is not None:  # write-through: the session outlives this worker
            self._persist_pin(session, snap, conversation)

    def release_session(self, session: str) -> bool:
        """Unpin the session's snapshot (it stays cached, evictable); False for an unknown session."""
        old = self._sessions.pop(session, None)
        if self.store is not None:
            self.store.delete_pin(session)
        if old is None:
            return False
        snap = old[0]
        snap.pins.discard(session)
        if self.store is not None and not snap.pins and id(snap) in self.lru:  # a closed session's file goes too
            self._forget_file(snap)
            if snap.tier == DISK:
                self._drop(snap, evicted=False)
        self._fit()
        return True

    def conversation(self, session: str) -> tuple[int, ...] | None:
        """Every token id of the session's conversation so far (the last turn's output included)."""
        got = self._sessions.get(session)
        return got[1] if got else None


def for_runner(config: EngineConfig, runner: Runner, model_dir=None) -> PrefixCache | None:
    """The engine's prefix cache, or None (disabled, or a runner without a state pool, e.g. a test fake)."""
    copier = runner.snapshot_copier
    if not config.prefix_cache or copier is None:
        return None
    rep = runner.memory_report()
    device = int(config.snapshot_device_share * (rep["pool_state_bytes"] + rep["pool_kv_bytes"]))
    store = None
    if config.snapshot_disk_bytes > 0 and config.snapshot_disk_dir:
        from model.runtime.disk_tier import open_tier  # torch-free; builds the model's identity

        store = open_tier(config, model_dir, copier)
    cache = PrefixCache(runner.allocator, copier, device, config.snapshot_host_bytes, store)
    n = cache.load_disk()
    if n:
        log.info("prefix cache: %d snapshots found on disk (%d sessions)", n, len(cache._sessions))
    return cache
