"""Torch-free continuous-batching scheduler (nano-vllm style: two deques, no tensors).

Each step:
  1. retire cancelled sequences (their slots go back to the allocator at once),
  2. admit waiting sequences FIFO while a slot is free and the allocator can reserve KV for
     prompt + max_new_tokens (reserved up front, so nothing is ever preempted),
  3. give every running decoding sequence its one token (least recently served first),
  4. fill the rest of `max_step_tokens` with prefill chunks of at most `prefill_chunk_tokens`,
     oldest sequence first, so a long prompt is spread over many steps while the decodes of
     the others keep flowing every step; a chunk ends exactly at the sequence's next snapshot boundary
     (Sequence.boundaries: where a chat prompt's system part ends, or an interval of a raw prompt whose prefix
     was seen before), where the prefix hooks save its state. With EngineConfig.prefill_time_share > 0 (off by default), while
     sequences are decoding the prefill tokens of a step are also bounded by time (StepCost: recent
     measured step times, fed back by the engine), so a step with prefill takes at most about
     (1 + share) x a decode-only step. With nothing decoding, prefill takes the whole token budget.
After the step (postprocess): each sequence advances by the tokens it fed and appends its sampled token; the
finish rule (finish_rule: EOS, a stop token id, length) ends it and frees its slot before the next schedule.
The prefix cache is asked at admission (resume from a snapshot) and told of each sequence's moments through
its hooks (model/engine/prefix_hooks.py: prefilled, finished; launched / settled for the step in flight).
A fork group (model/engine/forks.py: n rows of one request) waits and is admitted as one, its leader prefills
up to the fork point, and the rows start from copies of its state.
"""

from __future__ import annotations

import statistics
from collections import deque

from model.engine import forks
from model.engine.prefix_cache import PrefixCache
from model.engine.prefix_hooks import PrefixHooks
from model.engine.sequence import SeqStatus, Sequence
from model.runtime.blocks import blocks_needed
from model.types import (
    AdapterSlots,
    Allocator,
    ChunkKind,
    Copier,
    EngineConfig,
    FinishReason,
    QueueFull,
    SeqChunk,
    StepBatch,
)

MIN_PREFILL_TOKENS = 16  # waiting prompts always progress
WINDOW = 9  # recent steps each estimate is the median of


class StepCost:
    """Step-time model from measured steps: a decode-only step's time (the median of the last WINDOW) and the
    time each prefill token adds on top of it (summed excess over summed tokens of the last WINDOW steps with
    prefill: a ratio of sums, so small chunks, whose excess is mostly noise, weigh little). Every step pays a
    fixed cost (weights read once, per-op overhead) that a decode-only step measures; prefill steps are only
    learned from once there is a decode-only time to subtract. Torch-free; seconds."""

    def __init__(self, share: float = 0.0) -> None:
        self.share = share  # prefill time a step may add, as a fraction of a decode-only step's time; 0 = off
        self._decode: deque[float] = deque(maxlen=WINDOW)
        self._prefill: deque[tuple[float, int]] = deque(maxlen=WINDOW)  # (excess seconds, tokens)

    @property
    def decode_s(self) -> float | None:
        return statistics.median(self._decode) if self._decode else None

    @property
    def token_s(self) -> float | None:
        tokens = sum(n for _, n in self._prefill)
        return sum(e for e, _ in self._prefill) / tokens if tokens else None

    def observe(self, decode_rows: int, prefill_tokens: int, seconds: float) -> None:
        if prefill_tokens == 0:
            if decode_rows:
                self._decode.append(seconds)
            return
        base = self.decode_s
        if base is not None:
            self._prefill.append((max(seconds - base, 0.0), prefill_tokens))

    def prefill_budget(self) -> int | None:
        """Prefill tokens a step with decodes may take; None when off or while there are no estimates."""
        decode_s, token_s = self.decode_s, self.token_s
        if self.share <= 0 or decode_s is None or not token_s:
            return None
        return max(MIN_PREFILL_TOKENS, int(self.share * decode_s / token_s))


def finish_rule(seq: Sequence, eos_token_id: int | None, max_total_tokens: int) -> FinishReason | None:
    """Whether the token a sequence just sampled (its last output id) ends it: EOS (unless ignore_eos), a stop
    token id (STOP), max_new_tokens or the context budget (LENGTH); None: it goes on. Stop *strings* need the
    text: the engine finds those when it makes the token's text (model/engine/handle.py SeqOutput)."""
    tok, p = seq.output_ids[-1], seq.request.params
    if tok == eos_token_id and not p.ignore_eos:
        return FinishReason.EOS
    if tok in p.stop_token_ids:
        return FinishReason.STOP
    if len(seq.output_ids) >= seq.max_new_tokens or seq.num_tokens >= max_total_tokens:
        return FinishReason.LENGTH
    return None


class Scheduler:
    def __init__(self, config: EngineConfig, allocator: Allocator, prefix: PrefixCache | None = None,
                 eos_token_id: int | None = None, copier: Copier | None = None,
                 adapters: AdapterSlots | None = None) -> None:
        self.config = config
        self.adapters = adapters  # [LoRA] device adapter slots (model/types.py AdapterSlots); None: adapters off
        self.allocator = allocator
        self.copier = copier  # copies a fork group's state into its rows (None: a runner without a state pool)
        self.prefix = prefix
        self.hooks = PrefixHooks(prefix)  # when snapshots are taken (no-ops without a prefix cache)
        self.eos_token_id = eos_token_id
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.retired: list[Sequence] = []  # cancelled sequences retired by schedule(); see drain_retired
        self.steps = 0
        self._clock = 0
        self.cost = StepCost(config.prefill_time_share)

    def add(self, seq: Sequence) -> None:
        """Queue a sequence, or a fork group by its leader (seq.forks: its other rows, queued with it; each
        counts against max_queued_requests): all of it, or QueueFull."""
        queued = sum(1 + len(s.forks) for s in self.waiting)
        if queued + len(seq.forks) >= self.config.max_queued_requests:
            raise QueueFull(
                f"{queued} requests already waiting "
                f"(limit {self.config.max_queued_requests}); retry later"
            )
        for s in (seq, *seq.forks):
            s.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def drain_retired(self) -> list[Sequence]:
        out, self.retired = self.retired, []
        return out

    def _retire_cancelled(self) -> None:
        cancelled = [s for queue in (self.waiting, self.running) for s in queue if s.cancelled]
        cancelled += [row for s in self.waiting for row in s.forks if row.cancelled]  # queued with their leader
        for seq in cancelled:
            if any(not row.cancelled for row in seq.forks):
                continue  # a fork leader goes on prefilling for its rows; it ends once they forked
            self.finish(seq)
            self.retired.append(seq)

    def _admit(self) -> None:
        # FIFO: the head of the queue is never overtaken, so a big request is not starved by small ones.
        while self.waiting and self.allocator.num_free_slots > 0:
            seq = self.waiting[0]
            if seq.adapter is not None and not self.adapters.can_bind(seq.adapter):
                break  # [LoRA] every device adapter slot is in use by other adapters: wait for one
            # a fork group: its other rows' slots and blocks are reserved with the leader's, all or nothing
            rows, (_, extra) = len(seq.forks), forks.group_blocks(seq, self.allocator.block_size)
            if self.prefix is not None:  # [prefix cache] resume from the longest snapshot; snapshots make room
                got = self.prefix.admit(seq.prompt_ids, seq.reserve_tokens, seq.namespace, rows, extra)
                if got is None:
                    break
                seq.slot, seq.num_computed = got
                if seq.interval_points:  # those of its raw prompt's interval points whose prefix was seen before
                    seen = self.prefix.seen_before(seq.prompt_ids, seq.interval_points, seq.namespace)
                    seq.boundaries = tuple(sorted({*seq.boundaries, *seen}))
                seq.cached_tokens = seq.num_computed
            else:
                need = blocks_needed(seq.reserve_tokens, self.allocator.block_size) + extra
                if self.allocator.num_free_slots < 1 + rows or self.allocator.num_free_blocks < need:
                    break
                seq.slot = self.allocator.allocate(seq.reserve_tokens)
                seq.num_computed = 0
            self.waiting.popleft()
            for s in (seq, *forks.place_forks(seq, self.allocator)):
                self._bind(s)  # [LoRA] each row's state slot reads its adapter's device slot
                s.status = SeqStatus.RUNNING
                self.running.append(s)
            self._fork_if_ready(seq)

    def _fork_if_ready(self, seq: Sequence) -> None:
        if seq.forks and seq.num_computed == forks.fork_point(seq):
            self.hooks.forked(seq)
            forks.fork(seq, self.allocator, self.copier)

    def schedule(self) -> tuple[list[Sequence], StepBatch]:
        """Pick this step's work. Returns the sequences and their chunks, in the same order
        (decodes first, then prefill chunks); empty when there is nothing to run."""
        self._retire_cancelled()
        self._admit()
        budget = self.config.max_step_tokens
        seqs: list[Sequence] = []
        chunks: list[SeqChunk] = []

        decoding = sorted((s for s in self.running if not s.is_prefilling), key=lambda s: s.last_served)
        for seq in decoding[:budget]:
            # A decoding sequence feeds the token it sampled last step.
            chunks.append(SeqChunk(seq.slot, (seq.output_ids[-1],), seq.num_computed, True, ChunkKind.DECODE))
            seq.scheduled_tokens = 1
            self._clock += 1
            seq.last_served = self._clock  # strictly increasing: a true least-recently-served order
            seqs.append(seq)
        budget -= len(seqs)
        if seqs:  # decodes run this step: bound the prefill they wait for by time, too
            timed = self.cost.prefill_budget()
            if timed is not None:
                budget = min(budget, timed)

        for seq in self.running:
            if budget <= 0:
                break
            if not seq.is_prefilling or seq.leader is not None:  # a fork row waits for its leader's state
                continue
            stop = forks.fork_point(seq) if seq.forks else seq.prompt_len  # a fork leader stops there first
            n = min(stop - seq.num_computed, self.config.prefill_chunk_tokens, budget)
            if n <= 0:
                continue
            boundary = seq.next_boundary() if self.prefix is not None else None  # [prefix cache] ends at a boundary
            if boundary is not None:
                n = min(n, boundary - seq.num_computed)
            end = seq.num_computed + n
            ids = tuple(seq.prompt_ids[seq.num_computed : end])
            # A sequence's first chunk starts from a zeroed state; later ones continue from the slot's.
            kind = ChunkKind.FRESH if seq.num_computed == 0 else ChunkKind.CONTINUE
            chunks.append(SeqChunk(seq.slot, ids, seq.num_computed, end == seq.prompt_len, kind))
            seq.scheduled_tokens = n
            seqs.append(seq)
            budget -= n

        if seqs:
            self.steps += 1
        return seqs, StepBatch(tuple(chunks))

    def observe_step(self, seqs: list[Sequence], seconds: float) -> None:
        """The measured time of the step schedule() returned seqs for (call before postprocess)."""
        prefill = sum(s.scheduled_tokens for s in seqs if s.is_prefilling)
        self.cost.observe(sum(1 for s in seqs if not s.is_prefilling), prefill, seconds)

    def launched(self, seqs: list[Sequence]) -> None:
        """The step schedule() returned seqs for is on the device (until settled)."""
        self.hooks.launched(seqs)

    def settled(self, ok: bool = True) -> None:
        """The launched step was collected (ok) or failed: free the sequences whose end waited for it."""
        for seq in self.hooks.settled(ok):
            self.finish(seq)

    def postprocess(self, seqs: list[Sequence], new_tokens: list[int | None]) -> None:
        """Advance each scheduled sequence by the tokens it fed; append its sampled token (None for a prefill
        chunk that produced no logits); end (free the slot of) each one the finish rule ends."""
        if len(seqs) != len(new_tokens):
            raise ValueError(f"{len(seqs)} sequences but {len(new_tokens)} tokens")
        for seq, tok in zip(seqs, new_tokens, strict=True):
            seq.num_computed += seq.scheduled_tokens
            seq.scheduled_tokens = 0
            if tok is not None:
                seq.output_ids.append(tok)
            self._fork_if_ready(seq)
        sampled = [s for s, tok in zip(seqs, new_tokens, strict=True) if tok is not None]
        self.hooks.prefilled(seqs)
        for seq in sampled:
            if seq.status == SeqStatus.RUNNING:  # not one that ended while its step ran
                seq.finish_reason = finish_rule(seq, self.eos_token_id, self.config.max_total_tokens)
                if seq.finish_reason is not None:
                    self.end(seq, seq.finish_reason)

    def end(self, seq: Sequence, reason: FinishReason) -> None:
        """A sequence ended: free its slot, after the prefix cache's snapshot of a clean end (EOS, stop, length),
        which waits for settled() while the step in flight still feeds the sequence."""
        if self.hooks.finished(seq, reason):
            self.finish(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence from whichever queue holds it and free its slot now. Idempotent."""
        if seq.status == SeqStatus.FINISHED:
            return
        if seq.leader is not None:  # a fork row before its fork (queued with its leader, or running)
            seq.leader.forks.remove(seq)
            seq.leader = None
        if seq.status == SeqStatus.WAITING:
            if seq in self.waiting:
                self.waiting.remove(seq)
        else:
            self.running.remove(seq)
            if seq.slot is not None:
                if seq.adapter is not None:
                    self.adapters.unbind(seq.slot)
                self.allocator.free(seq.slot)
        if seq.adapter is not None:
            self.adapters.release(seq.adapter)  # held since submit (model/engine/engine.py)
        seq.slot = None
        seq.status = SeqStatus.FINISHED

    def _bind(self, seq: Sequence) -> None:
        if seq.adapter is not None:
            self.adapters.bind(seq.slot, seq.adapter)

    def abort_all(self) -> list[Sequence]:
        """Finish every queued and running sequence (shutdown); returns them."""
        seqs = [*self.waiting, *(row for s in self.waiting for row in s.forks), *self.running]
        for seq in seqs:
            self.finish(seq)
        return seqs
