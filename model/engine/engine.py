"""Engine: submit() -> Handle; one background thread runs the step loop (torch-free, like the scheduler)

    schedule -> launch (runner) -> [emit the last step's events] -> collect -> advance (scheduler) -> emit

The scheduler decides what runs and when a sequence is finished (its finish rule; the prefix cache's snapshot
hooks hang off it); the runner turns a step into tokens; the engine makes text and events of them (stop
strings included: model/engine/handle.py SeqOutput). Finished, cancelled and failed sequences leave the scheduler
(and free their slot) at once. An exception inside a step (CUDA OOM included) fails only that step's
sequences; the loop keeps serving.

A constrained request (GenerationRequest.constraint) is compiled in submit(), on the caller's thread, by the
GrammarCompiler seam (model/grammar; a GrammarError refuses it there); its row processor goes to the runner with the
slot (runner.open) and is closed when the sequence ends, however it ends (_retire).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model.engine import prefix_cache
from model.engine.forks import check_group
from model.engine.handle import Handle, SeqOutput, end_event
from model.engine.prefix_hooks import PrefixSessions
from model.engine.scheduler import Scheduler
from model.engine.sequence import Sequence, checked
from model.types import (
    AdapterInvalid,
    AdapterNotFound,
    AdapterSlots,
    EngineConfig,
    EngineNotReady,
    FailureKind,
    FinishReason,
    GenerationRequest,
    GrammarCompiler,
    GrammarError,
    Runner,
    Tokenizer,
    resolve_seed,
)

log = logging.getLogger(__name__)
SEED_MOD = 1 << 63  # a fork row's seed (seed + i) stays in the range of a request's


class Engine:
    def __init__(self, model_dir: Path, config: EngineConfig, model_name: str, *,
                 runner_factory: Callable[[Path, EngineConfig], Runner] | None = None,
                 tokenizer_factory: Callable[[Path], Tokenizer] | None = None,
                 grammar_factory: Callable[[Tokenizer, int], GrammarCompiler] | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.config = config
        self.model_name = model_name
        self._runner_factory = runner_factory
        self._tokenizer_factory = tokenizer_factory
        self._grammar_factory = grammar_factory
        self.runner: Runner | None = None
        # Constrained decoding (model/grammar); None: refused (a fake tokenizer without a grammar factory, or its
        # build failed: grammar_error says why).
        self.grammars: GrammarCompiler | None = None
        self.grammar_error = "this engine has no grammar compiler"
        self.tokenizer: Tokenizer | None = None
        self.scheduler: Scheduler | None = None
        self.prefix: prefix_cache.PrefixCache | None = None
        self.error: str | None = None
        self._ready = self._accepting = self._stop = self._shut = False  # _shut: shutdown() was called
        self._cv = threading.Condition()
        self.sessions = PrefixSessions(self._cv)  # the session API; its prefix cache is set once loaded
        self._loader: threading.Thread | None = None
        self._loop_thread: threading.Thread | None = None
        self._counters = dict(requests_total=0, prompt_tokens_total=0, generated_tokens_total=0,
                              prefill_tokens_total=0, steps=0, step_errors_total=0)
        self._finished = {r.value: 0 for r in FinishReason}

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._loader is None:
            self._loader = threading.Thread(target=self._load, name="engine-load", daemon=True)
            self._loader.start()

    def _load(self) -> None:
        try:
            t0 = time.monotonic()
            # Default parts, imported only when no factory is given (tests' fakes): the engine stays torch-free.
            if self._tokenizer_factory is None:
                from model.text.tokenizer import Tokenizer as HFTokenizer
            if self._runner_factory is None:
                from model.runtime.runner import ModelRunner
            self.tokenizer = (self._tokenizer_factory or HFTokenizer.from_dir)(self.model_dir)
            self.runner = (self._runner_factory or ModelRunner)(self.model_dir, self.config)
            self.runner.warmup()
            self._load_grammars()
            with self._cv:
                if self._shut:  # shutdown() came while loading: never become ready
                    log.info("engine: shut down during load")
                    return
                self.prefix = self.sessions.cache = prefix_cache.for_runner(self.config, self.runner, self.model_dir)
                self.scheduler = Scheduler(self.config, self.runner.allocator, self.prefix,
                                           self.tokenizer.eos_token_id, self.runner.snapshot_copier,
                                           self.runner.adapters)
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

    def _load_grammars(self) -> None:
        """The grammar compiler over this tokenizer: the factory's, or model/grammar's for the real tokenizer.
        A failure here only disables constrained requests (422), never the engine."""
        factory = self._grammar_factory
        if factory is None and self._tokenizer_factory is None:
            from model.grammar.compiler import for_tokenizer as factory
        if factory is None:
            return
        try:
            self.grammars = factory(self.tokenizer, self.runner.vocab_size)
        except Exception as e:
            self.grammar_error = f"the grammar compiler failed to load: {type(e).__name__}: {e}"
            log.exception("engine: %s", self.grammar_error)

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
            self._cv.wait_for(lambda: self.scheduler is None or not self.scheduler.has_work(), timeout)
            self._stop = True
            self._cv.notify_all()
        if self._loop_thread is not None:
            self._loop_thread.join(max(1.0, deadline - time.monotonic()))
        self.sessions.close(max(1.0, deadline - time.monotonic()))  # queued disk-tier writes (sessions)
        if self.scheduler is not None:
            with self._cv:
                left = self.scheduler.abort_all()
            msg = "the server shut down before this request finished"
            for seq in left:
                self._end(seq, FinishReason.ERROR, error=msg, failure=FailureKind.SHUTDOWN)
        self._ready = False

    # ---- requests -------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> Handle:
        return self.submit_n(request, 1)[0]

    def submit_n(self, request: GenerationRequest, n: int) -> list[Handle]:
        """`n` sequences of one request, forked from one prefill (model/engine/forks.py); row i samples with
        the request's seed + i (a sampled request without a seed: a random one + i). One handle per row."""
        if not self.ready:
            raise EngineNotReady(self.error or ("shutting down" if self._shut else "the model is still loading"))
        alloc = self.runner.allocator
        seq = checked(request, self.config, alloc.max_tokens_per_seq, self.runner.vocab_size)
        seqs = [seq, *(Sequence(request, seq.max_new_tokens, seq.namespace) for _ in range(n - 1))]
        seq.forks = seqs[1:]
        for row in seq.forks:
            row.leader = seq
        check_group(seq, n, self.config, alloc)
        if request.constraint is not None and self.grammars is None:
            raise GrammarError(f"constrained decoding is unavailable: {self.grammar_error}", status=422,
                               error_type="unsupported_grammar")
        slots = self._adapters(request.adapter) if request.adapter is not None else None
        base = resolve_seed(request.params)
        held = 0
        try:
            for i, row in enumerate(seqs):
                row.ctx = SeqOutput(request, self.tokenizer.detokenizer(), functools.partial(self._cancel, row),
                                    seed=None if base is None else (base + i) % SEED_MOD)
                if slots is not None:  # [LoRA] held until the row ends (the scheduler releases it)
                    row.namespace = slots.hold(request.adapter)
                    held += 1
                if request.constraint is not None:  # compiled here, on the caller's thread: never a step's delay
                    row.ctx.processor = self.grammars.processor(request.constraint)  # GrammarError (cached)
            with self._cv:
                if not self._accepting:
                    raise EngineNotReady("shutting down")
                self.scheduler.add(seq)  # raises QueueFull
                self._counters["requests_total"] += n
                self._counters["prompt_tokens_total"] += seq.prompt_len * n
                self._cv.notify_all()
        except BaseException:  # nothing was queued: free what the rows took
            for row in seqs:
                if row.ctx is not None and row.ctx.processor is not None:
                    row.ctx.processor.close()
            for _ in range(held):
                slots.release(request.adapter)
            raise
        return [row.ctx.handle for row in seqs]

    # ---- LoRA adapters (model/runtime/adapters.py through model/types.py AdapterSlots) ------------------------
    def _adapters(self, name: str | None = None) -> AdapterSlots:
        if not self.ready:
            raise EngineNotReady(self.error or "the model is still loading")
        if self.runner.adapters is None:
            if name is not None:
                raise AdapterNotFound(f"adapter {name!r} is not registered (adapters are off on this server: MAX_LORAS=0)")
            raise AdapterInvalid("adapters are off on this server: set MAX_LORAS (adapters on the device at once)")
        return self.runner.adapters

    def register_adapter(self, name: str, path: str) -> dict:
        return self._adapters().register(name, path)

    def unregister_adapter(self, name: str) -> None:
        self._adapters(name).unregister(name)

    def list_adapters(self) -> list[dict]:
        return self.runner.adapters.list() if self.ready and self.runner.adapters is not None else []

    def _cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        with self._cv:
            self._cv.notify_all()  # wake an idle loop so a waiting sequence is retired now

    def stats(self) -> dict:
        with self._cv:
            s = self.scheduler
            alloc = self.runner.allocator if self.runner is not None else None
            out: dict[str, Any] = dict(self._counters)
            out.update(ready=self.ready, running=len(s.running) if s else 0, waiting=len(s.waiting) if s else 0,
                       free_slots=alloc.num_free_slots if alloc else 0, total_slots=self.config.max_concurrent_seqs,
                       finished_total=dict(self._finished))
            if alloc is not None:
                out.update(kv_blocks_free=alloc.num_free_blocks, kv_blocks_total=alloc.num_blocks,
                           kv_block_tokens=alloc.block_size)
            if self.prefix is not None:
                out["prefix_cache"] = self.prefix.stats()
            if self.runner is not None and self.runner.adapters is not None:
                out["adapters"] = self.runner.adapters.report()
        return out

    # ---- sessions: serve/'s names for model/engine/prefix_hooks.py PrefixSessions (self.sessions) -----------------
    def session_conversation(self, session_id: str) -> tuple[int, ...] | None:
        return self.sessions.conversation(session_id)

    def release_session(self, session_id: str) -> bool:
        return self.sessions.release(session_id)

    def clear_prefix_cache(self) -> int:
        return self.sessions.clear()

    # ---- the loop ----
    def _loop(self) -> None:
        self.runner.bind_thread()  # DEVICE=cuda:N: this thread's current device (graph replay, Triton launches)
        # `held`: the last step's sampled tokens whose text and events are not made yet. With an
        # asynchronous device they are made while the next step runs there (launch, then emit, then
        # collect); a sequence a stop string ends meanwhile was already scheduled once more, and that
        # extra token is dropped. With a synchronous device (CPU) events go out before the next step.
        held = None
        while (step := self._schedule(held)) is not None:
            seqs, batch, err = step
            if err is not None:
                held = self._fail_step(seqs, err, held)
                continue
            if not seqs:
                held = self._emit(held)
                continue
            try:
                t0, pending = self._launch(seqs, batch)
            except Exception as e:
                held = self._fail_step(seqs, e, held)
                continue
            held = self._emit(held)  # overlapped with the device's work on this step
            try:
                held = self._advance(seqs, batch, self.runner.collect(pending), time.perf_counter() - t0)
            except Exception as e:
                held = self._fail_step(seqs, e, None)
                continue
            if not self.runner.asynchronous:
                held = self._emit(held)
        self._emit(held)

    def _schedule(self, held):
        """Wait for work (or `held` events), then pick this step's: (sequences, batch, None); None once stopping.
        The sequences schedule() retired (cancelled) end here. When schedule() itself fails (a bookkeeping bug
        must not kill the loop): (everything queued, None, the exception)."""
        with self._cv:
            while not self._stop and not self.scheduler.has_work() and held is None:
                self._cv.notify_all()  # idle: wake shutdown()'s drain wait
                self._cv.wait()
            if self._stop:
                return None
            try:
                step = (*self.scheduler.schedule(), None)
            except Exception as e:
                step = ([*self.scheduler.waiting, *self.scheduler.running], None, e)
            retired = self.scheduler.drain_retired()
        for seq in retired:
            self._end(seq, FinishReason.CANCELLED, seq.ctx.stops.flush())
        return step

    def _launch(self, seqs: list[Sequence], batch) -> tuple[float, object]:
        for seq, c in zip(seqs, batch.chunks, strict=True):
            # a new sequence in its slot: its sampling state (a resumed one starts with a CONTINUE chunk)
            if not seq.ctx.opened:
                self.runner.open(c.slot, seq.request.params, seq.ctx.seed, seq.prompt_ids, seq.ctx.processor)
                seq.ctx.opened = True
        t0 = time.perf_counter()
        pending = self.runner.launch(batch)
        with self._cv:
            self.scheduler.launched(seqs)
        return t0, pending

    def _advance(self, seqs: list[Sequence], batch, out, seconds: float):
        """Settle the collected step and hand its tokens to the scheduler (which frees, before the next schedule,
        the slots of sequences that end on a token); stop strings need the text: see _emit. Returns the
        step's events to make: (the sequences that got a token, in the order of out's rows; out)."""
        want = [s for s, c in zip(seqs, batch.chunks, strict=True) if c.want_logits]
        it = iter(out.token_ids)
        new = [next(it, None) if c.want_logits else None for c in batch.chunks]
        with self._cv:
            self.scheduler.settled(ok=True)
            if len(out.token_ids) != len(want):
                raise RuntimeError(f"runner returned {len(out.token_ids)} tokens for {len(want)} sequences")
            self._counters["steps"] += 1
            self._counters["prefill_tokens_total"] += sum(s.scheduled_tokens for s in seqs if s.is_prefilling)
            self._counters["generated_tokens_total"] += sum(not s.ctx.ended for s in want)
            self.scheduler.observe_step(seqs, seconds)
            self.scheduler.postprocess(seqs, new)
        return want, out

    def _emit(self, held) -> None:
        """Text and events of a collected step (held = (sequences, StepOutput)); returns None."""
        for i, seq in enumerate(held[0] if held is not None else ()):
            out, ctx = held[1], seq.ctx
            try:
                if ctx.ended:  # ended while the step ran (shutdown, a stop string found one step late)
                    continue
                if seq.cancelled:
                    self._end(seq, FinishReason.CANCELLED, ctx.stops.flush())
                    continue
                # the scheduler's finish reason for this token, or STOP for a stop string its text completes
                event = ctx.event(out.token_ids[i], out.logprobs[i], out.top[i], seq.finish_reason, self.tokenizer)
                if event.finish_reason is not None:
                    self._retire(seq, event.finish_reason)  # before the event: who saw the end sees the slot free
                ctx.handle.cached_tokens = seq.cached_tokens
                ctx.handle._put(event)
            except Exception as e:  # e.g. a detokenizer bug: fails this sequence, not the loop
                self._fail([seq], e)

    def _retire(self, seq: Sequence, reason: FinishReason) -> None:
        seq.ctx.ended = True
        if seq.ctx.processor is not None:  # its grammar matcher is freed with the sequence, however it ended
            seq.ctx.processor.close()
            seq.ctx.processor = None
        with self._cv:
            self._finished[reason.value] += 1
            self.scheduler.end(seq, reason)  # a clean end is snapshotted first (model/engine/prefix_hooks.py)

    def _end(self, seq: Sequence, reason: FinishReason, text: str = "", error: str | None = None,
             failure: FailureKind | None = None):
        self._retire(seq, reason)
        seq.ctx.handle._put(end_event(reason, text, error, failure))

    def _fail_step(self, seqs: list[Sequence], exc: Exception, held) -> None:
        """A step failed (scheduling, launch, collect): the last step's events go out, then its sequences fail."""
        self._emit(held)
        with self._cv:
            self.scheduler.settled(ok=False)  # sequences whose end waited for the step are freed
        self._fail(seqs, exc)

    def _fail(self, seqs: list[Sequence], exc: Exception) -> None:
        msg = f"generation step failed: {type(exc).__name__}: {exc}"[:500]
        log.error("engine: %s (failing %d sequences)", msg, len(seqs), exc_info=exc)
        failure = FailureKind.OUT_OF_MEMORY if type(exc).__name__ == "OutOfMemoryError" else FailureKind.STEP_FAILED
        self.runner.after_failure(exc)
        with self._cv:
            self._counters["step_errors_total"] += 1
        for seq in [*seqs, *(row for s in seqs for row in s.forks)]:  # rows waiting on a failed leader fail too
            if not seq.ctx.ended:
                self._end(seq, FinishReason.ERROR, error=msg, failure=failure)
