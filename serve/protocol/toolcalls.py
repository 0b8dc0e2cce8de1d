"""Granite tool calls in generated text -> OpenAI `tool_calls`, incrementally (torch-free).

The checkpoint's chat template teaches `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one
block per call (several for parallel calls; the Granite 3 `[{...}, {...}]` list in one block is read too).
ToolCallParser reads the text as it is generated and returns OpenAI deltas: `{"content": str}` for text
outside calls, `{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments": ""}}]}` when a call's
name is known, then `{"tool_calls": [{"index", "function": {"arguments": piece}}]}` as its arguments are
generated. The non-streamed answer is the same parser fed the whole text (`parse_tool_calls`), so the
concatenated stream always equals it.

Arguments: an object is passed through as the model wrote it (valid JSON, never re-encoded); an escaped JSON
string (`"arguments": "{\\"a\\": 1}"`) is decoded once, so it is never double-encoded. A call whose JSON is
cut (max_tokens, a stop string) keeps what was generated and `complete` is False: the response's finish_reason
is then "length"/"stop", not "tool_calls" (OpenAI does the same). A block that is not a call stays content.
Whitespace next to a call block is not content.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_WS = " \t\r\n"
_MAX_NAME = 256  # a longer "name" is not a call head


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _partial_tag(buf: str, tag: str) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of `tag` (it may still become the tag)."""
    return next((n for n in range(min(len(tag) - 1, len(buf)), 0, -1) if buf.endswith(tag[:n])), 0)


_PARTIAL = "partial"


def _head(buf: str) -> tuple[str, int] | str | None:
    """`{"name": "<n>", "arguments":` at the start of a call -> (name, end); _PARTIAL while it may still be;
    None when it is not (another key order, a list, junk: the block is then read whole)."""
    i, n = 0, len(buf)

    def ws(i: int) -> int:
        while i < n and buf[i] in _WS:
            i += 1
        return i

    for lit in ("{", '"name"', ":", None, ",", '"arguments"', ":"):
        i = ws(i)
        if i >= n:
            return _PARTIAL
        if lit is None:  # the name: a JSON string
            if buf[i] != '"':
                return None
            j, esc = i + 1, False
            while j < n and (esc or buf[j] != '"'):
                esc = not esc and buf[j] == "\\"
                j += 1
            if j >= n:
                return _PARTIAL if n - i <= _MAX_NAME else None
            try:
                name = json.loads(buf[i:j + 1])
            except ValueError:
                return None
            if not name:
                return None
            i = j + 1
            continue
        if not buf.startswith(lit, i):
            return _PARTIAL if lit.startswith(buf[i:]) else None
        i += len(lit)
    return name, i


def _as_call(obj) -> tuple[str, str] | None:
    """A parsed call object -> (name, arguments JSON text), or None when it is not a call."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def _as_calls(body: str) -> list[tuple[str, str]] | None:
    """One call object, or a JSON list of them (Granite 3); None unless every item is a call."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    items = obj if isinstance(obj, list) else [obj]
    calls = [_as_call(item) for item in items]
    return calls if calls and all(c is not None for c in calls) else None  # type: ignore[return-value]


def _string_prefix(buf: str) -> tuple[int, bool]:
    """How much of `buf` (the inside of a JSON string) can be decoded now, and whether the string ends
    there: a `\\` escape (a surrogate pair whole) is never split."""
    i, n = 0, len(buf)
    while i < n:
        c = buf[i]
        if c == '"':
            return i, True
        if c != "\\":
            i += 1
            continue
        if i + 1 >= n:
            return i, False
        if buf[i + 1] != "u":
            i += 2
            continue
        if i + 6 > n:
            return i, False
        code = buf[i + 2:i + 6]
        if _hex(code) and 0xD800 <= int(code, 16) <= 0xDBFF:  # a high surrogate: decode it with its pair
            if i + 12 > n:
                return i, False
            i += 12 if buf[i + 6:i + 8] == "\\u" else 6
            continue
        i += 6
    return i, False


def _hex(s: str) -> bool:
    return len(s) == 4 and all(c in "0123456789abcdefABCDEF" for c in s)


def _decode_string(raw: str) -> str:
    try:
        return json.loads('"' + raw + '"', strict=False)
    except ValueError:
        return raw  # a malformed escape: pass the text through rather than lose it


class ToolCallParser:
    """Feed generated text with push(); finish() at the end. Both return OpenAI deltas (see the module doc);
    `content`, `calls` and `complete` accumulate the non-streamed answer."""

    def __init__(self, new_id: Callable[[], str] = new_call_id) -> None:
        self.new_id = new_id
        self.buf = ""
        self.state = "text"  # text | head | block | args | tail
        self.after_call = False  # skip whitespace right after a call block
        self.content = ""
        self.calls: list[dict] = []
        self.complete = True  # False: the last call's arguments were cut
        self._mode = ""  # arguments value: "" (not started) | json | string | scalar
        self._depth, self._in_str, self._esc = 0, False, False
        self._out: list[dict] = []

    # ---- what the parser emits ----

    def _text(self, text: str) -> None:
        if text:
            self.content += text
            self._out.append({"content": text})

    def _start(self, name: str, arguments: str = "") -> None:
        call = {"id": self.new_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
        self.calls.append(call)
        first = {"index": len(self.calls) - 1, **call, "function": dict(call["function"])}
        self._out.append({"tool_calls": [first]})

    def _args(self, piece: str) -> None:
        if piece:
            self.calls[-1]["function"]["arguments"] += piece
            self._out.append({"tool_calls": [{"index": len(self.calls) - 1, "function": {"arguments": piece}}]})

    # ---- driving ----

    def push(self, text: str) -> list[dict]:
        self.buf += text
        return self._run(False)

    def finish(self) -> list[dict]:
        return self._run(True)

    def _run(self, final: bool) -> list[dict]:
        self._out = []
        step = {"text": self._in_text, "head": self._in_head, "block": self._in_block, "args": self._in_args,
                "tail": self._in_tail}
        while step[self.state](final):
            pass
        return self._out

    def _in_text(self, final: bool) -> bool:
        if self.after_call:
            self.buf = self.buf.lstrip(_WS)
            if not self.buf:
                return False
            self.after_call = False
        at = self.buf.find(TOOL_OPEN)
        if at >= 0:
            self._text(self.buf[:at].rstrip(_WS))
            self.buf, self.state = self.buf[at + len(TOOL_OPEN):], "head"
            return True
        if final:
            self._text(self.buf.rstrip(_WS) if self.calls else self.buf)
            self.buf = ""
            return False
        keep = _partial_tag(self.buf, TOOL_OPEN)
        ready = self.buf[:len(self.buf) - keep]
        send = ready.rstrip(_WS)  # whitespace waits: it is dropped if a call follows
        self._text(send)
        self.buf = self.buf[len(send):]
        return False

    def _in_head(self, final: bool) -> bool:
        found = _head(self.buf)
        if isinstance(found, tuple):
            name, end = found
            self._start(name)
            self.buf, self.state, self._mode = self.buf[end:], "args", ""
            self.complete = False
            return True
        if found == _PARTIAL and not final and TOOL_CLOSE not in self.buf and TOOL_OPEN not in self.buf:
            return False
        self.state = "block"
        return True

    def _in_block(self, final: bool) -> bool:
        """A block read whole (not the usual head): parsed at its `</tool_call>`, the next `<tool_call>` or the end."""
        close, nxt = self.buf.find(TOOL_CLOSE), self.buf.find(TOOL_OPEN)
        if close >= 0 and (nxt < 0 or close < nxt):
            body, rest, closed = self.buf[:close], self.buf[close + len(TOOL_CLOSE):], True
        elif nxt >= 0 or final:
            cut = nxt if nxt >= 0 else len(self.buf)
            body, rest, closed = self.buf[:cut], self.buf[cut:], False
        else:
            return False
        calls = _as_calls(body)
        if calls:
            for name, args in calls:
                self._start(name, args)
            self.complete, self.after_call = True, True
        else:
            self._text(TOOL_OPEN + (body + TOOL_CLOSE if closed else body.rstrip(_WS)))
        self.buf, self.state = rest, "text"
        return True

    def _in_args(self, final: bool) -> bool:
        if not self._mode:
            self.buf = self.buf.lstrip(_WS)
            if not self.buf:
                return False
            c = self.buf[0]
            if c == '"':
                self._mode, self.buf = "string", self.buf[1:]
            else:
                self._mode = "json" if c in "{[" else "scalar"
                self._depth, self._in_str, self._esc = 0, False, False
        if self._mode == "string":
            n, ended = _string_prefix(self.buf)
            self._args(_decode_string(self.buf[:n]))
            self.buf = self.buf[n + 1:] if ended else self.buf[n:]
            return self._end_args(ended, final)
        if self._mode == "scalar":
            n = next((i for i, c in enumerate(self.buf) if c in ",}<" + _WS), -1)
            ended = n >= 0
            n = n if ended else len(self.buf)
            self._args(self.buf[:n])
            self.buf = self.buf[n:]
            return self._end_args(ended, final)
        for i, c in enumerate(self.buf):
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif c == "\\":
                    self._esc = True
                elif c == '"':
                    self._in_str = False
            elif c == '"':
                self._in_str = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._args(self.buf[:i + 1])
                    self.buf = self.buf[i + 1:]
                    return self._end_args(True, final)
            elif c == "<":  # markup outside a string: the arguments were cut; the call stays incomplete
                self._args(self.buf[:i])
                self.buf, self.state = self.buf[i:], "tail"
                return True
        self._args(self.buf)
        self.buf = ""
        return False

    def _end_args(self, ended: bool, final: bool) -> bool:
        if ended:
            self.complete, self.state = True, "tail"
            return True
        if final:
            self.buf = ""  # a cut escape sequence: dropped
        return False

    def _in_tail(self, final: bool) -> bool:
        """After the arguments: the rest of the call object up to `</tool_call>` carries nothing."""
        close, nxt = self.buf.find(TOOL_CLOSE), self.buf.find(TOOL_OPEN)
        if close >= 0 and (nxt < 0 or close < nxt):
            self.buf, self.state, self.after_call = self.buf[close + len(TOOL_CLOSE):], "text", True
            return True
        if nxt >= 0:
            self.buf, self.state, self.after_call = self.buf[nxt:], "text", True
            return True
        self.buf = "" if final else self.buf[len(self.buf) - _partial_tag(self.buf, TOOL_CLOSE):]
        if final:
            self.after_call = True
        return False


def parse_tool_calls(text: str) -> tuple[str, list[dict], bool]:
    """The whole text at once -> (content, tool_calls, complete): exactly what streaming it yields."""
    p = ToolCallParser()
    p.push(text)
    p.finish()
    return p.content, p.calls, p.complete
