"""JSON output as a grammar: a JSON schema (or "any JSON object") as a Lark grammar for llguidance
(runtimes/constraint.py), the way OpenAI's `response_format` asks for it.

The output is compact: no whitespace between tokens (a random or rambling model cannot spend its
tokens on spaces) and "," / ":" separators. Strings, numbers and arrays the schema leaves open get
no fixed bound: the budget rule of runtimes/constraint.py bounds them by the tokens left, so every
output ends complete within max_tokens. (A fixed maxLength would narrow what validates and costs
llguidance several times the mask time per token: docs/benchmarks.md.) Pure data: nothing here
imports llguidance.
"""
from __future__ import annotations

import json

from mixtral_export.runtimes.requests import OptionError

COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}  # llguidance's x-guidance
ANY_OBJECT = {"type": "object"}


def json_grammar(schema: dict | None = None) -> str:
    """The Lark grammar of compact JSON that validates against `schema` (None: any JSON object,
    OpenAI's json_object); OptionError for a schema that is not a JSON object."""
    if schema is None:
        schema = ANY_OBJECT
    if not isinstance(schema, dict):
        raise OptionError(f"a JSON schema must be a JSON object, got {type(schema).__name__}", "grammar")
    return f"start: %json {json.dumps({**schema, 'x-guidance': {**(schema.get('x-guidance') or {}), **COMPACT}})}"
