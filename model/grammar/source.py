"""A Constraint (model/types.py) as the grammar text llguidance compiles: a JSON schema, a full-match regex, or
Granite's tool-call markup as a Lark grammar.

Whitespace is never free: JSON is written with the chat template's separators (`", "`, `": "`, the spacing of
Jinja's tojson) and no other whitespace, so a bounded schema has bounded output. Tool calls are exactly what
the checkpoint's chat template teaches an assistant turn (model/text/chat_template.py):

    <tool_call>\\n{"name": "<one of the tools>", "arguments": <valid against its parameters>}\\n</tool_call>

several joined by "\\n" when parallel calls are allowed. `<tool_call>` / `</tool_call>` are the tokenizer's own
added tokens where it has them (one token each, as the model was trained), else plain text.
"""

from __future__ import annotations

import json

from model.types import Constraint, GrammarError

# Bounds on what a request may hand the compiler (the compile itself is bounded by llguidance's parser limits).
MAX_SCHEMA_CHARS = 64 * 1024
MAX_REGEX_CHARS = 2048
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
OPEN, CLOSE = "<tool_call>", "</tool_call>"


def _schema(text: str, what: str) -> dict:
    if len(text) > MAX_SCHEMA_CHARS:
        raise GrammarError(f"{what} is {len(text)} characters; at most {MAX_SCHEMA_CHARS}")
    try:
        schema = json.loads(text) if text else {"type": "object"}
    except ValueError as e:
        raise GrammarError(f"{what} is not valid JSON: {e}") from None
    if schema is True:
        schema = {}
    if schema is False:
        raise GrammarError(f"{what} is `false`: nothing matches it")
    if not isinstance(schema, dict):
        raise GrammarError(f"{what} must be a JSON object, got {type(schema).__name__}")
    return schema


# Calendar-exact patterns for the date formats (llguidance's accept Feb 29 of any year, and day 31 of every month
# is a common slip): years 0001-9999, month lengths, leap years (every 4th, centuries only every 400th).
_YEAR = r"(000[1-9]|00[1-9]\d|0[1-9]\d\d|[1-9]\d{3})"
_LEAP = r"(\d\d(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
DATE = (rf"({_YEAR}-((0[13578]|1[02])-(0[1-9]|[12]\d|3[01])|(0[469]|11)-(0[1-9]|[12]\d|30)|02-(0[1-9]|1\d|2[0-8]))"
        rf"|{_LEAP}-02-29)")
DATE_TIME = DATE + r"T([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,6})?(Z|[+-]([01]\d|2[0-3]):[0-5]\d)"
FORMATS = {"date": DATE, "date-time": DATE_TIME}

_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf", "anyOf", "oneOf",
              "$ref", "if", "dependentSchemas")


def closed(schema):
    """The schema with `additionalProperties: false` on every object that lists `properties` and says nothing
    about others (OpenAI's strict mode, xgrammar's default): outputs still validate against the original, but
    a model never invents keys the schema did not ask for (unbounded output). Left open: allOf's branches and
    an object combined with other subschemas (closing one part would forbid the others' properties). Also the
    date formats as calendar-exact patterns (FORMATS)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k == "allOf" else closed(v)) if isinstance(v, dict | list) else v for k, v in schema.items()}
    if "allOf" in schema:
        out["allOf"] = [{**b, **{k: closed(v) for k, v in b.items() if k != "additionalProperties"}}
                        if isinstance(b, dict) else b for b in schema["allOf"]]
    if isinstance(schema.get("properties"), dict) and not any(k in schema for k in _OPEN_KEYS):
        out["additionalProperties"] = False
    if schema.get("format") in FORMATS and "pattern" not in schema:
        out["pattern"] = f"^{FORMATS[out.pop('format')]}$"
    return out


def _with_options(schema: dict) -> dict:
    """The schema closed (closed()) with our whitespace options (the request's own x-guidance is replaced)."""
    return {**closed(schema), "x-guidance": dict(JSON_OPTIONS)}


def tool_call_schema(constraint: Constraint) -> dict:
    """{"name": <tool>, "arguments": <its parameters>} for any of the constraint's tools (name first)."""
    options = []
    for tool in constraint.tools:
        params = _schema(tool.parameters, f"parameters of tool {tool.name!r}") or {"type": "object"}
        options.append({"type": "object", "properties": {"name": {"const": tool.name}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def _tool_calls(constraint: Constraint, specials: frozenset[str]) -> str:
    op, cl = (t if t in specials else json.dumps(t) for t in (OPEN, CLOSE))
    body = json.dumps(_with_options(tool_call_schema(constraint)))
    call = f'{op} "\\n" %json {body} "\\n" {cl}'
    if constraint.tool_mode == "required":
        start = 'call ("\\n" call)*' if constraint.parallel else "call"
        return f"%llguidance {{}}\nstart: {start}\ncall: {call}\n"
    # auto: free text; once the model opens a call (the special token, or the text as a lazy trigger), the call
    # is constrained, then free text again (one call at most unless parallel).
    text = "TEXT: /(.|\\n)*/"
    if OPEN in specials:
        rules = f"tag: TEXT {call}\n"
    else:
        rules = f'tag_open[lazy]: TEXT {json.dumps(OPEN)}\ntag: tag_open "\\n" %json {body} "\\n" {cl}\n'
    reps = "tag*" if constraint.parallel else "tag?"
    return f"%llguidance {{}}\nstart: {reps} TEXT\n{rules}{text}\n"


def grammar_text(constraint: Constraint, specials: frozenset[str] = frozenset()) -> str:
    """llguidance grammar text for `constraint`. specials: the markers that are single special tokens of the
    tokenizer (`<tool_call>`, `</tool_call>`). Raises GrammarError (400) for input it can tell is bad here;
    the compiler reports the rest."""
    from llguidance import LLMatcher

    if constraint.kind == "json":
        schema = _schema(constraint.value, "the JSON schema")
        return LLMatcher.grammar_from_json_schema(_with_options(schema))
    if constraint.kind == "regex":
        if not constraint.value:
            raise GrammarError("the regex is empty")
        if len(constraint.value) > MAX_REGEX_CHARS:
            raise GrammarError(f"the regex is {len(constraint.value)} characters; at most {MAX_REGEX_CHARS}")
        return LLMatcher.grammar_from_regex(constraint.value)
    return _tool_calls(constraint, specials)
