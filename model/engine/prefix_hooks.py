"""The prefix cache as the engine uses it (torch-free): when snapshots are taken (PrefixHooks, which the scheduler
calls at a sequence's moments) and the session API over its pins (PrefixSessions, which serve/ calls).

A snapshot holds exactly the tokens folded into the slot's state, so it is taken after the step that fed
them and before the slot is freed:
  prefilled  the prompt was just fully fed: snapshot the prompt (a later prompt that extends it resumes there);
             or a prefill chunk just ended at one of its boundaries (a chat prompt's system part, an interval):
             snapshot the prompt up to there (a later prompt sharing that part resumes there).
  forked     a fork group's leader reached its fork point (model/engine/forks.py): snapshot the prompt but its last
             token instead (the same request again resumes there and forks at once; an extension resumes there too),
             and its rows take no prompt snapshot of their own.
  finished   a clean end (EOS, stop, length) with the slot still held: snapshot prompt + output (all but the
             last token, which never went through the network), then the slot may be freed. On an asynchronous
             device a stop string is found while the sequence's next step already runs (launched): that step
             still moves its state, so the snapshot and the free wait for it (deferred).
  settled    the step in flight was collected: the deferred sequences are snapshotted (the step fed their last
             token; the token it sampled is dropped) and handed back to be freed; after a failed step they are
             handed back without a snapshot.
Every call is made with the engine's lock held. Without a prefix cache every hook is a no-op.
"""

from __future__ import annotations

import logging
import threading

from model.engine.prefix_cache import PrefixCache
from model.engine.sequence import Sequence
from model.types import FinishReason

log = logging.getLogger(__name__)
PERSIST_WAIT_S = 10.0
CLEAN_ENDS = (FinishReason.EOS, FinishReason.STOP, FinishReason.LENGTH)  # the state is whole: worth a snapshot


class PrefixHooks:
    def __init__(self, cache: PrefixCache | None) -> None:
        self.cache = cache
        self._inflight: set[int] = set()  # id() of the sequences in the launched, not yet collected step
        self._late: list[Sequence] = []  # ended while in flight: snapshot + free once it is collected

    def launched(self, seqs: list[Sequence]) -> None:
        if self.cache is not None:
            self._inflight = {id(s) for s in seqs}

    def prefilled(self, seqs: list[Sequence]) -> None:
        """After a step's postprocess: snapshot each prompt that was just fully prefilled, or prefilled up to one
        of its boundaries (Sequence.boundaries: the end of a chat prompt's system part, an interval)."""
        if self.cache is None:
            return
        for s in seqs:
            if s.cancelled or s.slot is None:
                continue
            if s.num_computed == s.prompt_len and not s.forked:
                self._take(s, final=False)
            elif s.num_computed in s.boundaries:  # a prefill chunk ended at a snapshot boundary (the scheduler)
                self._take(s, final=False, boundary=True)

    def forked(self, leader: Sequence) -> None:
        """A fork group's leader holds the prompt but its last token and its rows are about to copy it."""
        if self.cache is not None and leader.num_computed > leader.cached_tokens:  # else it was resumed from there
            self._take(leader, final=False)

    def finished(self, seq: Sequence, reason: FinishReason) -> bool:
        """A sequence ended: True when its slot may be freed now (after the snapshot of a clean end), False when
        its step is in flight and the slot is freed by settled()."""
        if self.cache is None or reason not in CLEAN_ENDS or seq.slot is None or seq.cancelled:
            return True
        if id(seq) in self._inflight:
            self._late.append(seq)
            return False
        self._take(seq, final=True)
        return True

    def settled(self, ok: bool) -> list[Sequence]:
        """The step in flight was collected (ok) or failed: the deferred sequences, to be freed now."""
        self._inflight = set()
        late, self._late = self._late, []
        if ok:
            for seq in late:
                self._take(seq, final=True, ahead=seq.scheduled_tokens)
        return late

    def _take(self, seq: Sequence, final: bool, ahead: int = 0, boundary: bool = False) -> None:
        # The state holds num_computed tokens: the prompt (final=False, right after its last prefill chunk) or
        # prompt + all output but the last token; `ahead` more once a collected step fed them (settled).
        try:
            ids = seq.ids
            sid = seq.request.session_id if final else None
            self.cache.take(seq.slot, ids[: seq.num_computed + ahead], sid, ids,
                            supersedes=seq.prompt_ids if final else None, namespace=seq.namespace, boundary=boundary)
        except Exception:  # a snapshot is an optimisation: never fail the request for it
            log.exception("prefix cache: snapshot of sequence %d failed", seq.seq_id)


class PrefixSessions:
    """The session API over the prefix cache's pins (SageMaker stateful sessions: serve/sessions.py), under the
    engine's lock: a finished turn's snapshot is pinned for its request's session_id (PrefixHooks above); without
    a prefix cache there are no sessions."""

    def __init__(self, lock: threading.Condition, cache: PrefixCache | None = None) -> None:
        self.lock = lock
        self.cache = cache  # set by the engine once loaded

    def conversation(self, session_id: str) -> tuple[int, ...] | None:
        """Prompt + output ids of the session's last finished turn (None: unknown / no prefix cache). With a disk
        tier, once its state is on disk (up to PERSIST_WAIT_S): a turn is answered when a restart would keep it."""
        with self.lock:
            cache = self.cache
            conv = cache.conversation(session_id) if cache is not None else None
        if conv is not None and not cache.wait_persisted(session_id, PERSIST_WAIT_S):
            log.warning("session %s: its state is not on disk yet after %.0f s", session_id, PERSIST_WAIT_S)
        return conv

    def close(self, timeout: float) -> bool:
        """At shutdown: wait until the disk tier's queued writes are done (a graceful shutdown keeps its sessions),
        then stop its writer. False when writes were still queued at the deadline."""
        store = self.cache.store if self.cache is not None else None
        if store is None:
            return True
        done = store.flush(timeout)
        store.close()
        return done

    def release(self, session_id: str) -> bool:
        """Unpin the session's snapshot (it stays cached, evictable). False for an unknown session."""
        with self.lock:
            return self.cache.release_session(session_id) if self.cache is not None else False

    def clear(self) -> int:
        """Drop every unpinned snapshot (their KV blocks go back to the pool); returns how many."""
        with self.lock:
            return self.cache.clear() if self.cache is not None else 0
