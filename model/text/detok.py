"""Incremental detokenization: text that becomes printable as each token id arrives.

Byte-level BPE tokens are byte strings, and a UTF-8 character can be split across tokens. We keep the
bytes of the current run of ordinary tokens in a codecs incremental UTF-8 decoder (errors="replace"):
an incomplete character stays buffered (never a premature U+FFFD), a truly invalid sequence becomes
U+FFFD exactly as a full `decode` would, and `finish()` flushes a dangling partial character as U+FFFD.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: byte value -> the printable character standing for it."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


def byte_table(tokens: Sequence[str | None], added: dict[int, str]) -> list[bytes]:
    """Per token id, the bytes it decodes to. `tokens[i]` is the vocab string; added tokens (id ->
    content) decode to their UTF-8 content. Unknown ids decode to nothing."""
    inverse = {c: b for b, c in bytes_to_unicode().items()}
    table = []
    for i, tok in enumerate(tokens):
        if i in added:
            table.append(added[i].encode())
        elif tok is None:
            table.append(b"")
        else:
            table.append(bytes(inverse[c] for c in tok if c in inverse))
    return table


class IncrementalDetokenizer:
    """push(token_id) -> newly printable text; `text` is everything so far (== decode of all ids pushed,
    once finish() is called)."""

    def __init__(self, table: list[bytes], skip_ids: frozenset[int] = frozenset()):
        self._table = table
        self._skip = skip_ids
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""

    def push(self, token_id: int) -> str:
        if token_id in self._skip:
            return ""
        raw = self._table[token_id] if 0 <= token_id < len(self._table) else b""
        new = self._utf8.decode(raw)
        self.text += new
        return new

    def finish(self) -> str:
        """End of stream: a dangling partial character becomes U+FFFD."""
        new = self._utf8.decode(b"", final=True)
        self.text += new
        return new


class PrefixDetokenizer:
    """Fallback for tokenizers that are not byte-level: re-decode a short window of recent ids and emit
    the new suffix once it no longer ends in an incomplete character (U+FFFD)."""

    def __init__(self, decode, skip_ids: frozenset[int] = frozenset()):
        self._decode = decode  # ids -> str
        self._skip = skip_ids
        self._ids: list[int] = []
        self._start = 0  # window start in _ids
        self._emitted = 0  # chars of decode(_ids[_start:]) already emitted
        self.text = ""

    def push(self, token_id: int) -> str:
        if token_id in self._skip:
            return ""
        self._ids.append(token_id)
        window = self._decode(self._ids[self._start :])
        if window.endswith("\ufffd"):
            return ""
        new = window[self._emitted :]
        self.text += new
        if len(self._ids) - self._start > 8:  # slide the window; keep a few ids of left context
            self._start = len(self._ids) - 4
            self._emitted = len(self._decode(self._ids[self._start :]))
        else:
            self._emitted = len(window)
        return new

    def finish(self) -> str:
        window = self._decode(self._ids[self._start :])
        new = window[self._emitted :]
        self._emitted = len(window)
        self.text += new
        return new
