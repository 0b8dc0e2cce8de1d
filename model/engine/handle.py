"""The client side of one generation (Handle) and the engine's side of its text: the stop-string buffer
(StopBuffer) and the per-sequence output state that turns sampled tokens into text (SeqOutput)."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator

from model.types import (
    Completion,
    Detokenizer,
    FailureKind,
    FinishReason,
    GenerationRequest,
    RowProcessor,
    TokenEvent,
    Tokenizer,
    TopToken,
    resolve_seed,
)


class StopBuffer:
    """Incremental text with stop strings: holds back any tail that could still become a stop string,
    and cuts the text at the first stop string that matches (the stop string itself is never emitted).

    Invariant: emitted text never ends in a proper prefix of a stop string, so a match can only lie
    inside the pending (held-back) text.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """Add newly decoded text; returns (text safe to emit now, whether a stop string matched)."""
        self.pending += piece
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            # longest suffix of pending that is a proper prefix of s
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Handle:
    """Events of one request. Iterate it (one consumer) or call result(); cancel() from any thread."""

    def __init__(self, prompt_tokens: int, request_id: str, on_cancel: Callable[[], None]) -> None:
        self.prompt_tokens = prompt_tokens
        self.request_id = request_id
        self.seed: int | None = None  # set by the engine: the seed a sampled request actually used
        self.cached_tokens = 0  # set by the engine before the first event: prompt tokens resumed from a snapshot
        self._queue: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()  # C-level: cheap put per token
        self._events: list[TokenEvent] = []
        self._done = False
        self._on_cancel = on_cancel

    def _put(self, event: TokenEvent) -> None:  # engine thread
        self._queue.put(event)

    @property
    def finished(self) -> bool:
        return self._done

    def __iter__(self) -> Iterator[TokenEvent]:
        while not self._done:
            event = self._queue.get()
            self._events.append(event)
            if event.finish_reason is not None:
                self._done = True
            yield event

    def cancel(self) -> None:
        # Idempotent; a no-op once finished. The engine frees the slot at its next step.
        if not self._done:
            self._on_cancel()

    def result(self) -> Completion:
        for _ in self:
            pass
        toks = [e for e in self._events if e.token_id >= 0]
        last = self._events[-1]
        return Completion(
            token_ids=tuple(e.token_id for e in toks),
            text="".join(e.text for e in self._events),
            finish_reason=last.finish_reason,
            prompt_tokens=self.prompt_tokens,
            logprobs=tuple(e.logprob for e in toks),
            token_texts=tuple(e.text for e in toks),
            specials=tuple(e.special for e in toks),
            top_tokens=tuple(e.top_tokens for e in toks),
            seed=self.seed,
            error=last.error,
            failure=last.failure,
            cached_tokens=self.cached_tokens,
        )


class SeqOutput:
    """The engine's side of one sequence's output (kept in Sequence.ctx): its handle, incremental text with its
    stop strings, and whether its last event is out."""

    def __init__(self, request: GenerationRequest, detok: Detokenizer, on_cancel: Callable[[], None],
                 seed: int | None = None) -> None:
        # the seed it samples with (reported back): `seed` (a fork row's), else the request's (or a random one)
        self.seed = seed if seed is not None else resolve_seed(request.params)
        self.handle = Handle(len(request.prompt_ids), request.request_id, on_cancel)
        self.handle.seed = self.seed
        self.detok = detok
        self.stops = StopBuffer(request.params.stop)
        self.ended = False  # the sequence's last event is out
        self.opened = False  # runner.open() done for its slot (before its first chunk)
        self.processor: RowProcessor | None = None  # its grammar's matcher (Engine.submit), closed when it ends

    def event(self, tok: int, logprob: float, top: list[tuple[int, float]], reason: FinishReason | None,
              tokenizer: Tokenizer) -> TokenEvent:
        """The event of a sampled token: the text it adds, and the reason the sequence ends with it: `reason` (the
        scheduler's finish rule, model/engine/scheduler.py) or STOP when the text completes a stop string."""
        special = bool(tokenizer.is_special(tok))
        if reason in (FinishReason.EOS, FinishReason.STOP):
            text = self.final_text()  # an EOS or stop token adds no text
        else:
            text, stopped = self.stops.push(self.detok.push(tok))
            if stopped:
                reason = FinishReason.STOP
            elif reason is not None:  # LENGTH
                text += self.final_text()
        tops = top_tokens(top, tokenizer.token_text) if top else ()
        return TokenEvent(tok, text, logprob, special, reason, tops)

    def final_text(self) -> str:
        # End of stream: the detokenizer's dangling bytes (if any) and the held-back text that never
        # became a stop string are released.
        out, stopped = self.stops.push(self.detok.finish())
        return out if stopped else out + self.stops.flush()


def end_event(reason: FinishReason, text: str = "", error: str | None = None,
              failure: FailureKind | None = None) -> TokenEvent:
    """The closing event of a cancelled or failed sequence (no token)."""
    return TokenEvent(token_id=-1, text=text, logprob=0.0, finish_reason=reason, error=error, failure=failure)


def top_tokens(pairs: list[tuple[int, float]], decode: Callable[[int], str]) -> tuple[TopToken, ...]:
    return tuple(TopToken(t, decode(t), lp) for t, lp in pairs)
