"""Structured-output request fields -> model/types.py Constraint (torch-free).

    response_format   OpenAI chat and completions: text | json_object | json_schema {"name", "schema", "strict"}
    tool_choice       OpenAI chat: none | auto | required | {"type": "function", "function": {"name"}} with tools
    grammar           TGI parameters.grammar: {"type": "json" | "regex" | "json_schema", "value": ...}

Schemas cross to the engine as canonical JSON text (json.dumps(sort_keys=True): equal schemas share one compiled
grammar). What is checked here is the shape (a schema is a JSON object whose keywords have the right JSON types,
a tool_choice names a declared tool, texts are bounded); whether the grammar engine can compile a schema or a
regex is the engine's answer (GrammarError from Engine.submit, passed through with its status).
"""

from __future__ import annotations

import json
from typing import Any

from model.types import Constraint, ToolSpec
from serve.protocol.fields import invalid

MAX_GRAMMAR_CHARS = 65536  # a schema's canonical JSON, a regex, or all tools' parameters together
MAX_TOOLS = 128
MAX_TOOL_NAME = 256
MAX_SCHEMA_DEPTH = 32
JSON_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
               "unevaluatedProperties", "unevaluatedItems", "additionalItems")


def _check_schema(s: Any, where: str, depth: int = 0) -> None:
    """The JSON types of the keywords a grammar is built from (a schema may be an object, or true/false)."""
    if isinstance(s, bool):
        return
    if not isinstance(s, dict):
        raise invalid(f"{where} must be a JSON schema (an object), got {type(s).__name__}")
    if depth > MAX_SCHEMA_DEPTH:
        raise invalid(f"{where} nests subschemas deeper than {MAX_SCHEMA_DEPTH}")
    t = s.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        bad = [x for x in types if not isinstance(x, str) or x not in JSON_TYPES]
        if bad or not types:
            raise invalid(f"{where}.type must be one of {', '.join(sorted(JSON_TYPES))} (or a list of them), "
                          f"got {json.dumps(t)[:60]}")
    for key in _SCHEMA_MAPS:
        if key in s:
            if not isinstance(s[key], dict):
                raise invalid(f"{where}.{key} must be an object of schemas")
            for name, sub in s[key].items():
                _check_schema(sub, f"{where}.{key}.{name}", depth + 1)
    for key in _SCHEMA_LISTS:
        if key in s:
            if not isinstance(s[key], list) or (key != "prefixItems" and not s[key]):
                raise invalid(f"{where}.{key} must be a non-empty list of schemas")
            for i, sub in enumerate(s[key]):
                _check_schema(sub, f"{where}.{key}[{i}]", depth + 1)
    for key in _SCHEMA_ONE:
        if key in s and not (key == "items" and isinstance(s[key], list)):
            _check_schema(s[key], f"{where}.{key}", depth + 1)
    if "required" in s and not (isinstance(s["required"], list) and all(isinstance(x, str) for x in s["required"])):
        raise invalid(f"{where}.required must be a list of property names")
    if "enum" in s and not isinstance(s["enum"], list):
        raise invalid(f"{where}.enum must be a list")
    for key in ("pattern", "format", "$ref"):
        if key in s and not isinstance(s[key], str):
            raise invalid(f"{where}.{key} must be a string")
    for key in ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties"):
        if key in s and (isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < 0):
            raise invalid(f"{where}.{key} must be a non-negative integer")


def _bounded(text: str, where: str) -> str:
    if len(text) > MAX_GRAMMAR_CHARS:
        raise invalid(f"{where} is {len(text)} characters; at most {MAX_GRAMMAR_CHARS}")
    return text


def schema_text(schema: Any, where: str) -> str:
    """A JSON schema (an object, or JSON text of one) -> its canonical text; 422 naming `where` otherwise."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise invalid(f"{where} is a string but not JSON: {e}") from None
    _check_schema(schema, where)
    if schema is True:
        return ""  # anything: any JSON object, as json_object asks
    if schema is False:
        raise invalid(f"{where} is false: no output can match it")
    return _bounded(json.dumps(schema, sort_keys=True), where)


def response_format(raw: Any) -> Constraint | None:
    """OpenAI `response_format` -> a json Constraint, or None for text."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise invalid('response_format must be an object {"type": "text" | "json_object" | "json_schema", ...}')
    kind = raw["type"]
    allowed = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
    if kind not in allowed:
        raise invalid(f"response_format.type must be text, json_object or json_schema, got {kind[:40]!r}")
    unknown = sorted(set(raw) - allowed[kind])
    if unknown:
        raise invalid(f"unknown parameter(s) in response_format: {', '.join(unknown)}")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json", "")
    js = raw.get("json_schema")
    if not isinstance(js, dict):
        raise invalid('response_format.json_schema must be an object {"name", "schema", "strict", "description"}')
    unknown = sorted(set(js) - {"name", "schema", "strict", "description"})
    if unknown:
        raise invalid(f"unknown parameter(s) in response_format.json_schema: {', '.join(unknown)}")
    if not isinstance(js.get("name", ""), str) or not isinstance(js.get("description", ""), str):
        raise invalid("response_format.json_schema.name and .description must be strings")
    if js.get("strict") is not None and not isinstance(js["strict"], bool):
        raise invalid("response_format.json_schema.strict must be true or false")
    if "schema" not in js or js["schema"] is None:
        return Constraint("json", "")
    return Constraint("json", schema_text(js["schema"], "response_format.json_schema.schema"))


def declared_tools(raw: Any) -> tuple[dict, ...]:
    """OpenAI `tools` -> the list as given (the chat template renders it), each checked."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise invalid("tools must be a list")
    if len(raw) > MAX_TOOLS:
        raise invalid(f"tools has {len(raw)} entries; at most {MAX_TOOLS}")
    names: set[str] = set()
    for i, tool in enumerate(raw):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise invalid(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": str, ...}}}}")
        if len(fn["name"]) > MAX_TOOL_NAME:
            raise invalid(f"tools[{i}].function.name is longer than {MAX_TOOL_NAME} characters")
        if fn["name"] in names:
            raise invalid(f"tools[{i}].function.name {fn['name'][:64]!r} is declared twice")
        names.add(fn["name"])
        if fn.get("parameters") is not None:
            _check_schema(fn["parameters"], f"tools[{i}].function.parameters")
    return tuple(raw)


def _spec(tool: dict) -> ToolSpec:
    fn = tool["function"]
    params = fn.get("parameters")
    return ToolSpec(fn["name"], json.dumps({} if params is None else params, sort_keys=True))


def _choice(choice: Any) -> str | tuple[str]:
    """tool_choice -> "none" | "auto" | "required", or (name,) for a named function."""
    if choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function", choice)  # the chat shape, or the Responses API's flat {"type", "name"}
        if isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]:
            return (fn["name"],)
    raise invalid('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                  '{"name": str}}' + (f", got {json.dumps(choice)[:60]}" if choice is not None else ""))


def tool_constraint(tools: tuple[dict, ...], choice: Any, parallel: bool | None) -> tuple[Constraint | None, bool]:
    """(tools as declared, tool_choice, parallel_tool_calls) -> (the Constraint, whether the output may hold calls).

    "none": the template still lists the tools (the model knows them) but no call is parsed or constrained;
    "auto": free text, and a `<tool_call>` the model opens is constrained to the declared tools; "required":
    one call of any declared tool (several when parallel); a named function: calls of that tool only."""
    mode = _choice("auto" if choice is None else choice)
    if mode == "none" or (mode == "auto" and not tools):
        return None, False
    if not tools:
        raise invalid(f"tool_choice {json.dumps(choice)[:80]} needs tools: the request declares none")
    specs = tuple(_spec(t) for t in tools)
    if isinstance(mode, tuple):
        specs = tuple(s for s in specs if s.name == mode[0])
        if not specs:
            names = ", ".join(t["function"]["name"] for t in tools)
            raise invalid(f"tool_choice names function {mode[0][:64]!r}, which is not in tools (declared: "
                          f"{names[:200]})")
    _bounded("".join(s.parameters for s in specs), "tools' parameters")
    return Constraint("tool_calls", tools=specs, tool_mode="auto" if mode == "auto" else "required",
                      parallel=True if parallel is None else parallel), True


def tgi_grammar(raw: Any) -> Constraint | None:
    """TGI `parameters.grammar` -> a json or regex Constraint."""
    if raw is None:
        return None
    where = "parameters.grammar"
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise invalid(f'{where} must be an object {{"type": "json" | "regex" | "json_schema", "value": ...}}')
    unknown = sorted(set(raw) - {"type", "value"})
    if unknown:
        raise invalid(f"unknown parameter(s) in {where}: {', '.join(unknown)}")
    kind, value = raw["type"], raw.get("value")
    if kind == "json":
        if value is None:
            raise invalid(f"{where}.value must be a JSON schema (an object, or JSON text of one)")
        return Constraint("json", schema_text(value, f"{where}.value"))
    if kind == "json_schema":  # TGI 3: {"name"?, "schema"}
        if not isinstance(value, dict) or "schema" not in value:
            raise invalid(f'{where}.value must be {{"name": str, "schema": {{...}}}} for type json_schema')
        return Constraint("json", schema_text(value["schema"], f"{where}.value.schema"))
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise invalid(f"{where}.value must be a non-empty regular expression string")
        return Constraint("regex", _bounded(value, f"{where}.value"))
    raise invalid(f"{where}.type must be json, regex or json_schema, got {kind[:40]!r}")
