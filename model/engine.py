"""Engine: submit() -> Handle; one background thread runs the step loop (torch-free, like the scheduler)

    schedule -> runner.step(batch) = sampled tokens -> per sequence: append, detokenize, stop checks, emit

Finished, cancelled and failed sequences leave the scheduler (and free their slot) at once. An
exception inside a step (CUDA OOM included) fails only that step's sequences; the loop keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model import prefix_cache
from model.handle import Handle, StopBuffer, end_event, top_tokens
from model.scheduler import Scheduler, Sequence
from model.types import (
    Detokenizer,
    EngineConfig,
    EngineNotReady,
    FailureKind,
    FinishReason,
    GenerationRequest,
    InputTooLong,
    InvalidRequest,
    Runner,
    TokenEvent,
    Tokenizer,
    resolve_seed,
)

log = logging.getLogger(__name__)
_SNAPSHOT_AT = (FinishReason.EOS, FinishReason.STOP, FinishReason.LENGTH)  # a clean end: the state is whole


class _SeqCtx:
    """Engine-side state of one sequence (kept in Sequence.ctx)."""

    def __init__(self, handle: Handle, detok: Detokenizer, stops: StopBuffer, seed: int | None) -> None:
        self.handle = handle
        self.detok = detok
        self.stops = stops
        self.seed = seed
        self.ended = False  # the sequence's last event is out
        self.opened = False  # runner.open() done for its slot (before its first chunk)


class Engine:
    def __init__(self, model_dir: Path, config: EngineConfig, model_name: str, *,
                 runner_factory: Callable[[Path, EngineConfig], Runner] | None = None,
                 tokenizer_factory: Callable[[Path], Tokenizer] | None = None) -> None:
        # Injectable for tests; default: model.runner.ModelRunner and model.tokenizer.Tokenizer.from_dir.
        self.model_dir = Path(model_dir)
        self.config = config
        self.model_name = model_name
        self._runner_factory = runner_factory
        self._tokenizer_factory = tokenizer_factory
        self.runner: Runner | None = None
        self.tokenizer: Tokenizer | None = None
        self.scheduler: Scheduler | None = None
        self.prefix: prefix_cache.PrefixCache | None = None
        self._inflight: set[int] = set()  # id() of the sequences in the launched, not yet collected step
        self._late: list[Sequence] = []  # [prefix cache] ended while in flight: snapshot + free after collect
        self.error: str | None = None
        self._ready = False
        self._accepting = False
        self._stop = False
        self._shut = False  # shutdown() was called
        self._cv = threading.Condition()
        self._loader: threading.Thread | None = None
        self._loop_thread: threading.Thread | None = None
        self._counters = dict(requests_total=0, prompt_tokens_total=0, generated_tokens_total=0,
                              prefill_tokens_total=0, steps=0, step_errors_total=0)
        self._finished = {r.value: 0 for r in FinishReason}

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._loader is not None:
            return
        self._loader = threading.Thread(target=self._load, name="engine-load", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            t0 = time.monotonic()
            if self._runner_factory is None:
                from model.runner import ModelRunner as runner_factory
            else:
                runner_factory = self._runner_factory
            if self._tokenizer_factory is None:
                from model.tokenizer import Tokenizer

                tokenizer_factory = Tokenizer.from_dir
            else:
                tokenizer_factory = self._tokenizer_factory
            self.tokenizer = tokenizer_factory(self.model_dir)
            self.runner = runner_factory(self.model_dir, self.config)
            self.runner.warmup()
            with self._cv:
                if self._shut:  # shutdown() came while loading: never become ready
                    log.info("engine: shut down during load")
                    return
                self.prefix = prefix_cache.for_runner(self.config, self.runner)
                self.scheduler = Scheduler(self.config, self.runner.allocator, self.prefix)
                self._loop_thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
                self._loop_thread.start()
                self._accepting = True
                self._ready = True
            r = self.runner
            log.info("engine ready: model=%s path=%s device=%s dtype=%s parameters=%.2fM slots=%d in %.1fs",
                     self.model_name, self.model_dir, r.device, r.dtype, r.num_parameters / 1e6,
                     self.config.max_concurrent_seqs, time.monotonic() - t0)
        except Exception as e:  # the server reports this on /ping (503) and in its log
            self.error = f"model load failed: {type(e).__name__}: {e}"
            log.exception("engine: %s", self.error)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until loaded (True) or failed / timed out (False)."""
        if self._loader is not None:
            self._loader.join(timeout)
        return self._ready

    @property
    def ready(self) -> bool:
        return self._ready and self._accepting

    def shutdown(self, timeout: float = 25.0) -> None:
        """Stop admitting, let in-flight sequences finish for up to `timeout` s, then end the rest
        with an ERROR event and stop the loop."""
        deadline = time.monotonic() + timeout
        with self._cv:
            self._shut = True
            self._accepting = False
            while self.scheduler is not None and self.scheduler.has_work():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            self._stop = True
            self._cv.notify_all()
        if self._loop_thread is not None:
            self._loop_thread.join(max(1.0, deadline - time.monotonic()))
        if self.scheduler is not None:
            with self._cv:
                left = self.scheduler.abort_all()
            msg = "the server shut down before this request finished"
            for seq in left:
                self._emit_end(seq, FinishReason.ERROR, error=msg, failure=FailureKind.SHUTDOWN)
        self._ready = False

    # ---- requests -------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> Handle:
        if not self.ready:
            why = "shutting down" if self._shut else "the model is still loading"
            raise EngineNotReady(self.error or why)
        cfg = self.config
        ids, p = request.prompt_ids, request.params
        n = len(ids)
        if n == 0:
            raise InvalidRequest("the prompt is empty (0 tokens)")
        if n > cfg.max_input_tokens:
            limit = cfg.max_input_tokens
            raise InputTooLong(f"the prompt has {n} tokens; the limit is max_input_tokens={limit}")
        # Context budget: max_total_tokens, and never more than the KV pool can ever hold for one sequence.
        budget = min(cfg.max_total_tokens, self.runner.allocator.max_tokens_per_seq)
        if n >= budget:
            raise InputTooLong(f"the prompt has {n} tokens; at most {budget - 1} fit this server's context")
        if p.max_new_tokens < 1:
            raise InvalidRequest(f"max_new_tokens must be >= 1, got {p.max_new_tokens}")
        vocab = self.runner.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})")
        seq = Sequence(request, max_new_tokens=min(p.max_new_tokens, budget - n))
        handle = Handle(n, request.request_id, lambda: self._cancel(seq))
        handle.seed = resolve_seed(p)
        seq.ctx = _SeqCtx(handle, self.tokenizer.detokenizer(), StopBuffer(p.stop), handle.seed)
        with self._cv:
            if not self._accepting:
                raise EngineNotReady("shutting down")
            self.scheduler.add(seq)  # raises QueueFull
            self._counters["requests_total"] += 1
            self._counters["prompt_tokens_total"] += n
            self._cv.notify_all()
        return handle

    def _cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        with self._cv:
            self._cv.notify_all()  # wake an idle loop so a waiting sequence is retired now

    def stats(self) -> dict:
        with self._cv:
            s = self.scheduler
            alloc = self.runner.allocator if self.runner is not None else None
            out: dict[str, Any] = dict(self._counters)
            out.update(
                ready=self.ready,
                running=len(s.running) if s else 0,
                waiting=len(s.waiting) if s else 0,
                free_slots=alloc.num_free_slots if alloc else 0,
                total_slots=self.config.max_concurrent_seqs,
                finished_total=dict(self._finished),
            )
            if alloc is not None:
                out.update(kv_blocks_free=alloc.num_free_blocks, kv_blocks_total=alloc.num_blocks,
                           kv_block_tokens=alloc.block_size)
            if self.prefix is not None:
                out["prefix_cache"] = self.prefix.stats()
        return out

    # ---- prefix cache + sessions (model/prefix_cache.py) -------------------------------------------
    def session_conversation(self, session_id: str) -> tuple[int, ...] | None:
        """Prompt + output ids of the session's last finished turn (None: unknown / no prefix cache)."""
        with self._cv:
            return self.prefix.conversation(session_id) if self.prefix is not None else None

    def release_session(self, session_id: str) -> bool:
        """Unpin the session's snapshot (it stays cached, evictable). False for an unknown session."""
        with self._cv:
            return self.prefix.release_session(session_id) if self.prefix is not None else False

    def clear_prefix_cache(self) -> int:
        """Drop every unpinned snapshot (their KV blocks go back to the pool); returns how many."""
        with self._cv:
            return self.prefix.clear() if self.prefix is not None else 0

    def _snapshot(self, seq: Sequence, final: bool, ahead: int = 0) -> None:
        # [prefix cache] hook, called with self._cv held. The state holds num_computed tokens: the prompt
        # (final=False, right after its last prefill chunk) or prompt + all output but the last token; `ahead`
        # more once a collected step fed them (_settle_late).
        try:
            ids = (seq.prompt_ids + seq.output_ids)[: seq.num_computed + ahead]
            sid = seq.request.session_id if final else None
            self.prefix.take(seq.slot, ids, sid, seq.prompt_ids + seq.output_ids,
                             supersedes=seq.prompt_ids if final else None)
        except Exception:  # a snapshot is an optimisation: never fail the request for it
            log.exception("engine: snapshot of sequence %d failed", seq.seq_id)

    # ---- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        self.runner.bind_thread()  # DEVICE=cuda:N: this thread's current device (graph replay, Triton launches)
        # `held`: the last step's sampled tokens whose text and events are not made yet. With an
        # asynchronous device they are made while the next step runs there (launch, then emit, then
        # collect); a sequence a stop string ends meanwhile was already scheduled once more, and that
        # extra token is dropped. With a synchronous device (CPU) events go out before the next step.
        held = None
        while True:
            with self._cv:
                while not self._stop and not self.scheduler.has_work() and held is None:
                    self._cv.notify_all()  # idle: wake shutdown()'s drain wait
                    self._cv.wait()
                if self._stop:
                    break
                err = None
                try:
                    seqs, batch = self.scheduler.schedule()
                except Exception as e:  # a bookkeeping bug must not kill the loop: fail what is queued
                    err, seqs = e, [*self.scheduler.waiting, *self.scheduler.running]
                retired = self.scheduler.drain_retired()
            if err is not None:
                held = self._emit(held)
                self._fail(seqs, err)
                continue
            for seq in retired:
                self._emit_end(seq, FinishReason.CANCELLED, seq.ctx.stops.flush())
            if not seqs:
                held = self._emit(held)
                continue
            try:
                for seq, c in zip(seqs, batch.chunks, strict=True):
                    # a new sequence in its slot: its sampling state (a resumed one starts with a CONTINUE chunk)
                    if not seq.ctx.opened:
                        self.runner.open(c.slot, seq.request.params, seq.ctx.seed, seq.prompt_ids)
                        seq.ctx.opened = True
                t0 = time.perf_counter()
                pending = self.runner.launch(batch)
            except Exception as e:
                held = self._emit(held)
                self._fail(seqs, e)
                continue
            self._inflight = {id(seq) for seq in seqs}
            held = self._emit(held)  # overlapped with the device's work on this step
            try:
                out = self.runner.collect(pending)
                self._settle_late(snapshot=True)
                want = self._advance(seqs, batch, out, time.perf_counter() - t0)
            except Exception as e:
                self._settle_late(snapshot=False)
                self._fail(seqs, e)
                continue
            held = (want, out)
            if not self.runner.asynchronous:
                held = self._emit(held)
        self._emit(held)

    def _advance(self, seqs: list[Sequence], batch, out, seconds: float) -> list[Sequence]:
        """Append the sampled tokens and free, before the next schedule, the slots of sequences that end
        on a token (EOS, stop token, length); stop strings need the text: see _emit. Returns the
        sequences that got a token, in the order of out's rows."""
        want = [s for s, c in zip(seqs, batch.chunks, strict=True) if c.want_logits]
        if len(out.token_ids) != len(want):
            raise RuntimeError(f"runner returned {len(out.token_ids)} tokens for {len(want)} sequences")
        it = iter(out.token_ids)
        new = [next(it) if c.want_logits else None for c in batch.chunks]
        eos, limit = self.tokenizer.eos_token_id, self.config.max_total_tokens
        with self._cv:
            self._counters["steps"] += 1
            self._counters["prefill_tokens_total"] += sum(s.scheduled_tokens for s in seqs if s.is_prefilling)
            self._counters["generated_tokens_total"] += sum(not s.ctx.ended for s in want)
            self.scheduler.observe_step(seqs, seconds)
            self.scheduler.postprocess(seqs, new)
            if self.prefix is not None:  # [prefix cache] snapshot each prompt that was just fully prefilled
                for s in want:
                    if s.num_computed == s.prompt_len and not s.cancelled and s.slot is not None:
                        self._snapshot(s, final=False)
            for seq, tok in zip(want, out.token_ids, strict=True):
                p = seq.request.params
                if ((tok == eos and not p.ignore_eos) or tok in p.stop_token_ids
                        or len(seq.output_ids) >= seq.max_new_tokens or seq.num_tokens >= limit):
                    if self.prefix is not None and not seq.cancelled and not seq.ctx.ended:
                        self._snapshot(seq, final=True)  # [prefix cache] before the slot is freed
                    self.scheduler.finish(seq)
        return want

    def _emit(self, held) -> None:
        """Text and events of a collected step (held = (sequences, StepOutput)); returns None."""
        if held is not None:
            want, out = held
            for i, seq in enumerate(want):
                try:
                    self._on_token(seq, out.token_ids[i], out.logprobs[i], out.top[i])
                except Exception as e:  # e.g. a detokenizer bug: fails this sequence, not the loop
                    self._fail([seq], e)
        return None

    def _on_token(self, seq: Sequence, tok: int, logprob: float, top: list[tuple[int, float]]) -> None:
        ctx, p, cfg = seq.ctx, seq.request.params, self.config
        if ctx.ended:  # ended while the step ran (shutdown, a stop string found one step late)
            return
        if seq.cancelled:
            self._emit_end(seq, FinishReason.CANCELLED, ctx.stops.flush())
            return
        special = bool(self.tokenizer.is_special(tok))
        reason = None
        if tok == self.tokenizer.eos_token_id and not p.ignore_eos:
            reason, text = FinishReason.EOS, self._final_text(ctx)  # the EOS token adds no text
        elif tok in p.stop_token_ids:
            reason, text = FinishReason.STOP, self._final_text(ctx)
        else:
            text, stopped = ctx.stops.push(ctx.detok.push(tok))
            if stopped:
                reason = FinishReason.STOP
            elif len(seq.output_ids) >= seq.max_new_tokens or seq.num_tokens >= cfg.max_total_tokens:
                reason = FinishReason.LENGTH
                text += self._final_text(ctx)
        tops = top_tokens(top, self.tokenizer.token_text) if top else ()
        if reason is not None:
            self._retire(seq, reason)  # before the event: a client that saw the end sees the slot free
        ctx.handle.cached_tokens = seq.cached_tokens
        ctx.handle._put(TokenEvent(tok, text, logprob, special, reason, tops))

    @staticmethod
    def _final_text(ctx: _SeqCtx) -> str:
        # End of stream: the detokenizer's dangling bytes (if any) and the held-back text that never
        # became a stop string are released.
        out, stopped = ctx.stops.push(ctx.detok.finish())
        return out if stopped else out + ctx.stops.flush()

    def _retire(self, seq: Sequence, reason: FinishReason) -> None:
        seq.ctx.ended = True
        with self._cv:
            self._finished[reason.value] += 1
            if self.prefix is not None and seq.slot is not None and reason in _SNAPSHOT_AT:
                if id(seq) in self._inflight:  # a stop string found while its next step runs: that step
                    self._late.append(seq)  # still moves its state; snapshot + free once it is collected
                    return
                self._snapshot(seq, final=True)  # [prefix cache] before the slot is freed
            self.scheduler.finish(seq)

    def _settle_late(self, snapshot: bool) -> None:
        """[prefix cache] After a collect: the sequences _retire deferred. The collected step fed their last
        token (its sampled token is dropped), so their state holds prompt + every output token."""
        self._inflight = set()
        late, self._late = self._late, []
        with self._cv:
            for seq in late:
                if snapshot:
                    self._snapshot(seq, final=True, ahead=seq.scheduled_tokens)
                self.scheduler.finish(seq)

    def _emit_end(self, seq: Sequence, reason: FinishReason, text: str = "", error: str | None = None,
                  failure: FailureKind | None = None):
        self._retire(seq, reason)
        seq.ctx.handle._put(end_event(reason, text, error, failure))

    def _fail(self, seqs: list[Sequence], exc: Exception) -> None:
        msg = f"generation step failed: {type(exc).__name__}: {exc}"[:500]
        log.error("engine: %s (failing %d sequences)", msg, len(seqs), exc_info=exc)
        failure = FailureKind.OUT_OF_MEMORY if type(exc).__name__ == "OutOfMemoryError" else FailureKind.STEP_FAILED
        if self.runner is not None:
            self.runner.after_failure(exc)
        with self._cv:
            self._counters["step_errors_total"] += 1
        for seq in seqs:
            if not seq.ctx.ended:
                self._emit_end(seq, FinishReason.ERROR, error=msg, failure=failure)
