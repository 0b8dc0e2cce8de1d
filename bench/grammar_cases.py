"""The structured-output cases of issue 19, shared by the grammar tests (tests/model/grammar) and the benches
(bench/grammar_engines.py, bench/run.py): JSON schemas covering nested objects, arrays with min/max items, enums,
required and optional fields, integers and numbers, string pattern and format, anyOf, $ref; full-match regexes;
a typical 5-tool declaration. `bounded`: every string has a maxLength / enum / pattern of bounded length, every
array a maxItems and every number a bounded integer, so a grammar with no free runs must finish."""

from __future__ import annotations

import json

S = {"type": "string", "maxLength": 12}
INT = {"type": "integer", "minimum": -50, "maximum": 999}

# (name, schema, bounded)
SCHEMAS: list[tuple[str, dict, bool]] = [
    ("flat", {"type": "object", "properties": {"name": S, "age": INT}, "required": ["name", "age"]}, True),
    ("optional", {"type": "object", "properties": {"a": S, "b": INT, "c": {"type": "boolean"}}, "required": ["a"]},
     True),
    ("enum", {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "size": {"enum": ["S", "M", "L", 1, None]}},
              "required": ["color", "size"]}, True),
    ("const", {"type": "object", "properties": {"kind": {"const": "point"}, "x": INT, "y": INT},
               "required": ["kind", "x", "y"]}, True),
    ("nested", {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": INT, "name": S,
                                                  "address": {"type": "object", "properties": {"city": S, "zip": {
                                                      "type": "string", "pattern": "^[0-9]{5}$"}},
                                                              "required": ["city", "zip"]}},
                 "required": ["id", "name", "address"]}}, "required": ["user"]}, True),
    ("array", {"type": "object", "properties": {"items": {"type": "array", "items": INT, "minItems": 1,
                                                          "maxItems": 4}}, "required": ["items"]}, True),
    ("array-of-objects", {"type": "array", "minItems": 2, "maxItems": 3, "items": {
        "type": "object", "properties": {"k": S, "v": {"type": "boolean"}}, "required": ["k", "v"]}}, True),
    ("top-array", {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 0, "maxItems": 5}, True),
    ("integer-range", {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 20},
                                                        "m": {"type": "integer", "exclusiveMinimum": 0,
                                                              "exclusiveMaximum": 5}},
                       "required": ["n", "m"]}, True),
    ("number", {"type": "object", "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}},
                "required": ["x"]}, False),
    ("pattern", {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2,4}$"},
                                                  "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}},
                 "required": ["code", "hex"]}, True),
    ("format-date", {"type": "object", "properties": {"day": {"type": "string", "format": "date"}},
                     "required": ["day"]}, True),
    ("format-uuid", {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}},
                     "required": ["id"]}, True),
    ("format-email", {"type": "object", "properties": {"to": {"type": "string", "format": "email"}},
                      "required": ["to"]}, False),
    ("format-datetime", {"type": "object", "properties": {"at": {"type": "string", "format": "date-time"}},
                         "required": ["at"]}, False),
    ("anyOf", {"type": "object", "properties": {"v": {"anyOf": [INT, S, {"type": "null"}]}}, "required": ["v"]},
     True),
    ("anyOf-objects", {"anyOf": [
        {"type": "object", "properties": {"cat": S}, "required": ["cat"], "additionalProperties": False},
        {"type": "object", "properties": {"dog": INT}, "required": ["dog"], "additionalProperties": False}]}, True),
    ("ref", {"$defs": {"pt": {"type": "object", "properties": {"x": INT, "y": INT}, "required": ["x", "y"]}},
             "type": "object", "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}},
             "required": ["a", "b"]}, True),
    ("ref-recursive", {"$defs": {"node": {"type": "object", "properties": {
        "v": INT, "kids": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/node"}}},
        "required": ["v"], "additionalProperties": False}}, "$ref": "#/$defs/node"}, False),
    ("no-additional", {"type": "object", "properties": {"only": S}, "required": ["only"],
                       "additionalProperties": False}, True),
    ("allOf", {"allOf": [{"type": "object", "properties": {"a": INT}, "required": ["a"]},
                         {"properties": {"b": {"enum": [True, False]}}, "required": ["b"]}]}, True),
    ("string-lengths", {"type": "object", "properties": {"s": {"type": "string", "minLength": 3, "maxLength": 6}},
                        "required": ["s"]}, True),
    ("bool-null", {"type": "object", "properties": {"ok": {"type": "boolean"}, "none": {"type": "null"}},
                   "required": ["ok", "none"]}, True),
    ("pydantic-like", {"title": "Person", "type": "object", "properties": {
        "name": {"title": "Name", "type": "string", "maxLength": 20},
        "age": {"title": "Age", "type": "integer", "minimum": 0, "maximum": 130},
        "email": {"anyOf": [{"type": "string", "maxLength": 30}, {"type": "null"}], "default": None},
        "tags": {"title": "Tags", "type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
        "required": ["name", "age", "email", "tags"], "additionalProperties": False}, True),
    ("deep", {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object",
              "properties": {"c": {"type": "object", "properties": {"d": {"enum": ["x", "y"]}}, "required": ["d"]}},
              "required": ["c"]}}, "required": ["b"]}}, "required": ["a"]}, True),
]

# (regex, which a whole output must match)
REGEXES = [
    r"[a-z]{3,8}",
    r"(yes|no|maybe)",
    r"\d{3}-\d{3}-\d{4}",
    r"[A-Z][a-z]{1,10}( [A-Z][a-z]{1,10}){0,2}",
    r"(\+|-)?[0-9]{1,6}(\.[0-9]{1,3})?",
    r"[0-9a-f]{8}-[0-9a-f]{4}",
    r"(GET|POST) /[a-z]{1,8}(/[a-z0-9]{1,8}){0,3}",
    r"\[(true|false)(, (true|false)){0,4}\]",
]


def _obj(props: dict, required: list[str]) -> dict:
    return {"type": "object", "properties": props, "required": required}


# A typical 5-tool agent declaration (OpenAI `tools[].function`).
TOOLS: list[dict] = [
    {"name": "get_weather", "parameters": _obj({"location": {"type": "string", "maxLength": 40},
                                                "unit": {"enum": ["celsius", "fahrenheit"]}}, ["location"])},
    {"name": "get_time", "parameters": _obj({"timezone": {"type": "string", "maxLength": 30}}, ["timezone"])},
    {"name": "search", "parameters": _obj({"query": {"type": "string", "maxLength": 60},
                                           "limit": {"type": "integer", "minimum": 1, "maximum": 50}}, ["query"])},
    {"name": "book_table", "parameters": _obj({
        "restaurant": {"type": "string", "maxLength": 40}, "people": {"type": "integer", "minimum": 1, "maximum": 20},
        "time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"}}, ["restaurant", "people", "time"])},
    {"name": "send_email", "parameters": _obj({
        "to": {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 1, "maxItems": 3},
        "subject": {"type": "string", "maxLength": 60}, "body": {"type": "string", "maxLength": 200}},
        ["to", "subject"])},
]


def canonical(obj) -> str:
    """JSON text as model/types.py ToolSpec / Constraint hold it (sorted keys: equal schemas, equal keys)."""
    return json.dumps(obj, sort_keys=True)


def tool_specs(tools=None):
    from model.types import ToolSpec

    return tuple(ToolSpec(t["name"], canonical(t["parameters"])) for t in (tools or TOOLS))
