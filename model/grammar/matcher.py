"""One sequence's grammar state: an llguidance matcher behind the sampler's LogitsProcessor hook (model/types.py).

fill(allowed, chunk) runs on the host once per step that samples the row, while the device runs the forward:
  - a DECODE chunk carries the token sampled for this row last step: the matcher advances on it; the first fill
    sees the prompt's last prefill chunk (FRESH or, resumed from the prefix cache, CONTINUE): prompt tokens
    are never fed to the grammar;
  - then the mask: llguidance's packed bitmask (one bit per token, int32 words) unpacked into the row's bool
    `allowed`. End-of-text is in it only where the grammar accepts; once the grammar can take nothing more
    (accepted and stopped) the mask is end-of-text alone, so the sequence ends there.
A matcher in an error state (a sampled token outside its mask: a bug, or a per-step parser limit hit) also
forces end-of-text rather than fail the whole step; the error is kept in `error` and logged once.
"""

from __future__ import annotations

import logging

import numpy as np

from model.types import ChunkKind, SeqChunk

log = logging.getLogger(__name__)


class GrammarRow:
    """model/types.py RowProcessor for one sequence; `matcher` is its own llguidance LLMatcher (a copy)."""

    def __init__(self, matcher, eos_token_id: int, vocab_size: int) -> None:
        self._m = matcher
        self.eos = eos_token_id
        self.vocab = vocab_size
        self._words = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self._started = False
        self.error: str | None = None
        self.tokens = 0  # tokens the grammar advanced on

    @property
    def closed(self) -> bool:
        return self._m is None

    def close(self) -> None:
        self._m = None

    def advance(self, token: int) -> None:
        m = self._m
        if m is not None and not m.is_error():
            m.consume_token(token)
            self.tokens += 1

    def fill_words(self) -> bool:
        """The next token's packed mask into self._words; False when only end-of-text may follow."""
        m = self._m
        if m.is_error() or m.is_stopped():
            return False
        m.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        return not m.is_error()

    def fill(self, allowed, chunk: SeqChunk) -> None:
        if self._m is None:  # closed: the sequence is over (a late fill leaves the row free)
            return
        if chunk.kind == ChunkKind.DECODE and self._started:
            self.advance(chunk.token_ids[0])
        self._started = True
        row = allowed.numpy()
        if self.fill_words():
            row[:] = np.unpackbits(self._words.view(np.uint8), count=self.vocab, bitorder="little").view(np.bool_)
            return
        if self._m.is_error() and self.error is None:
            self.error = self._m.get_error()[:300]
            log.warning("grammar: matcher error after %d tokens, ending the sequence: %s", self.tokens, self.error)
        row[:] = False
        row[self.eos] = True
