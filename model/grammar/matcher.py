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
import os

import numpy as np
import torch

from model.types import ChunkKind, SeqChunk

log = logging.getLogger(__name__)


# llguidance's LLExecutor (a thread pool computing many rows' masks at once), made on first use, and only where
# there are cores for it: on the 2-core VM, under load, it was slower than one row after another
# (bench/results/grammar-cpu.json), the GPU hosts have 16 or more.
PARALLEL_MIN_CPUS = 4
_EXECUTOR: list = []


def executor():
    """The shared LLExecutor, or None where one thread is as good (fewer than PARALLEL_MIN_CPUS cores)."""
    if not _EXECUTOR:
        import llguidance

        _EXECUTOR.append(llguidance.LLExecutor() if len(os.sched_getaffinity(0)) >= PARALLEL_MIN_CPUS else None)
    return _EXECUTOR[0]


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

    def _step(self, chunk: SeqChunk) -> bool:
        """Advance on the chunk (a DECODE chunk after the first fill); True when a mask is to be computed,
        False when only end-of-text may follow (complete, or the matcher failed)."""
        if chunk.kind == ChunkKind.DECODE and self._started:
            self.advance(chunk.token_ids[0])
        self._started = True
        m = self._m
        return not (m.is_error() or m.is_stopped())

    def _end_only(self, allowed) -> None:
        """Only end-of-text allowed (a torch row or its numpy view)."""
        if self._m.is_error() and self.error is None:
            self.error = self._m.get_error()[:300]
            log.warning("grammar: matcher error after %d tokens, ending the sequence: %s", self.tokens, self.error)
        allowed[:] = False
        allowed[self.eos] = True

    def _bits(self) -> np.ndarray | None:
        """The next token's mask as (V,) bool, computed from the packed words; None when only end-of-text."""
        self._m.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        if self._m.is_error():
            return None
        return np.unpackbits(self._words.view(np.uint8), count=self.vocab, bitorder="little").view(np.bool_)

    def fill(self, allowed, chunk: SeqChunk) -> None:
        if self._m is None:  # closed: the sequence is over (a late fill leaves the row free)
            return
        bits = self._bits() if self._step(chunk) else None
        if bits is None:
            self._end_only(allowed)
        else:  # (a host to host copy: no read back from a device, no sync)
            allowed.copy_(torch.from_numpy(bits))

    @classmethod
    def fill_rows(cls, rows: list[GrammarRow], allowed: np.ndarray, idx: list[int], chunks: list[SeqChunk]) -> None:
        """The step's grammar rows at once (model/types.py LogitsProcessor), into the numpy view of the step's
        host mask: each advances, then the masks are computed by llguidance's thread pool into one packed
        buffer, unpacked in one numpy call (one row after another where there is no pool)."""
        live = [i for i, r in enumerate(rows) if r._m is not None]
        todo = [i for i in live if rows[i]._step(chunks[i])]
        pool = executor()
        if pool is None:
            for i in todo:
                bits = rows[i]._bits()
                if bits is not None:
                    allowed[idx[i]] = bits
        elif todo:
            words = np.zeros((len(todo), rows[0]._words.size), dtype=np.int32)
            pool.unsafe_compute_mask_ptr([(rows[i]._m, n) for n, i in enumerate(todo)], words.ctypes.data,
                                         words.shape[1] * 4, len(todo))
            bits = np.unpackbits(words.view(np.uint8), axis=1, count=rows[0].vocab, bitorder="little")
            allowed[[idx[i] for i in todo]] = bits.view(np.bool_)
        computed = set(todo)
        for i in live:
            if i not in computed or rows[i]._m.is_error():
                rows[i]._end_only(allowed[idx[i]])
