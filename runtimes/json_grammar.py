"""JSON output as a grammar: a JSON schema (or "any JSON object") as a Lark grammar for llguidance
(runtimes/constraint.py), the way OpenAI's `response_format` asks for it.

The output is compact: no whitespace between tokens (a random or rambling model cannot spend its
tokens on spaces) and "," / ":" separators. Strings and arrays the schema leaves unbounded get
generous default bounds (DEFAULT_MAX_LENGTH characters, DEFAULT_MAX_ITEMS items), which only narrow
what validates; the budget rule of runtimes/constraint.py ends every output within max_tokens.
Pure data: nothing here imports llguidance.
"""
from __future__ import annotations

import json

from mixtral_export.runtimes.requests import OptionError

DEFAULT_MAX_LENGTH = 512  # characters of a string the schema does not bound
DEFAULT_MAX_ITEMS = 128  # items of an array the schema does not bound
COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}  # llguidance's x-guidance
ANY_OBJECT = {"type": "object"}
SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
SCHEMA_VALUES = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")


def json_grammar(schema: dict | None = None) -> str:
    """The Lark grammar of JSON that validates against `schema` (None: any JSON object, OpenAI's
    json_object); OptionError for a schema that is not a JSON object."""
    if schema is None:
        schema = ANY_OBJECT
    if not isinstance(schema, dict):
        raise OptionError(f"a JSON schema must be a JSON object, got {type(schema).__name__}", "grammar")
    bounded = with_default_bounds(schema)
    bounded["x-guidance"] = {**(schema.get("x-guidance") or {}), **COMPACT}
    return f"start: %json {json.dumps(bounded)}"


def with_default_bounds(schema):
    """A copy of `schema` whose unbounded strings and arrays (at any depth) get the default bounds."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [with_default_bounds(s) for s in out[key]]
    for key in SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: with_default_bounds(s) for name, s in out[key].items()}
    for key in SCHEMA_VALUES:
        if key in out:
            out[key] = with_default_bounds(out[key])
    types = out.get("type")
    types = types if isinstance(types, list) else [types]
    free = not any(k in out for k in ("enum", "const", "pattern", "format"))
    if "string" in types and free and "maxLength" not in out and out.get("minLength", 0) <= DEFAULT_MAX_LENGTH:
        out["maxLength"] = DEFAULT_MAX_LENGTH
    if "array" in types and "maxItems" not in out and out.get("minItems", 0) <= DEFAULT_MAX_ITEMS:
        out["maxItems"] = DEFAULT_MAX_ITEMS
    return out
