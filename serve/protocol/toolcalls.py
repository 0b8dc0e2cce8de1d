"""Parse Granite / Hermes style tool calls out of generated text.

The model writes `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, possibly several, and
sometimes with `arguments` as a JSON-encoded string. Well-formed calls are removed from the content and
returned OpenAI-style; a malformed block is left in the content untouched.
"""

from __future__ import annotations

import json
import re
import uuid

# A block's body never contains another opening tag, so one broken block cannot swallow the next.
TOOL_OPEN = "<tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*((?:(?!<tool_call>).)*?)\s*(?:</tool_call>|$)", re.DOTALL)


def _as_calls(body: str) -> list[dict] | None:
    # One JSON object, or a JSON list of them (the Granite 3 `[{...}, {...}]` shape).
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    items = obj if isinstance(obj, list) else [obj]
    calls = [_as_call(item) for item in items]
    return calls if calls and all(c is not None for c in calls) else None


def _as_call(obj) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {
        "id": "call_" + uuid.uuid4().hex[:24],
        "type": "function",
        "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)},
    }


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(content without the parsed tool-call blocks, OpenAI-style tool_calls).

    An unterminated final block (generation stopped before `</tool_call>`) is parsed if its JSON is
    complete; otherwise it stays in the content.
    """
    calls: list[dict] = []
    pieces: list[str] = []
    pos = 0
    for m in _BLOCK.finditer(text):
        found = _as_calls(m.group(1))
        if found is None:
            continue
        calls.extend(found)
        pieces.append(text[pos : m.start()])
        pos = m.end()
    pieces.append(text[pos:])
    content = "".join(pieces) if calls else text
    return (content.strip() if calls else content), calls


class ToolCallHoldback:
    """Streams content but holds back text from the first `<tool_call>` on (and any tail that could
    start one), so tool-call markup is never streamed as content; finish() parses the held text."""

    def __init__(self) -> None:
        self.held = ""
        self.in_call = False

    def push(self, text: str) -> str:
        self.held += text
        if self.in_call:
            return ""
        at = self.held.find(TOOL_OPEN)
        if at >= 0:
            out, self.held, self.in_call = self.held[:at], self.held[at:], True
            return out
        keep = next((n for n in range(min(len(TOOL_OPEN) - 1, len(self.held)), 0, -1)
                     if self.held.endswith(TOOL_OPEN[:n])), 0)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def finish(self) -> tuple[str, list[dict]]:
        text, self.held = self.held, ""
        return parse_tool_calls(text) if self.in_call else (text, [])
