"""The grammar that forces a v3 model to call a tool: `[TOOL_CALLS]`, then the JSON list mistral-common
writes ([{"name": "f", "arguments": {...}}, ...], its spacing: ", " and ": "), each call's arguments
valid against that function's `parameters` schema, in llguidance's Lark dialect (a JSON schema is
embedded as `%json {...}`, a control token by id as `<[ID]>`).

`tool_choice` "required" allows every function, a named choice only that one; without parallel
calls the list holds exactly one call, with them 1 to MAX_CALLS. A call may carry the 9-character
"id" the model saw in its history (the parser ignores it and gives each call a fresh id). Strings,
numbers and arrays a schema leaves open are bounded as response_format's are: by the engine's budget
rule, which ends a constrained request complete within its max_tokens (runtimes/constraint.py).
"""
from __future__ import annotations

import json
from collections.abc import Sequence

from mixtral_export.tool_calls import Function

MAX_CALLS = 8  # calls in one answer at most, with parallel calls
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}  # json.dumps's


def arguments_schema(function: Function) -> dict:
    """The function's parameters schema as an object schema (no parameters: the empty object, as
    mistral-common's grammar has it), written as json.dumps writes JSON
    (llguidance's "x-guidance")."""
    schema = dict(function.parameters) or {"type": "object", "properties": {}, "additionalProperties": False}
    schema.setdefault("type", "object")
    return {"x-guidance": JSON_STYLE, **schema}


def literal(text: str) -> str:
    """A Lark string literal of `text` (JSON's escaping is Lark's)."""
    return json.dumps(text, ensure_ascii=False)


def tool_call_grammar(functions: Sequence[Function], marker_id: int, parallel: bool = True) -> str:
    """The Lark grammar of an answer that calls one of `functions` (all of a request's tools for
    "required", the named one alone), opening with the [TOOL_CALLS] token `marker_id`."""
    if not functions:
        raise ValueError("a tool call grammar needs at least one function")
    rules = []
    for n, function in enumerate(functions):
        head = literal('{"name": ' + json.dumps(function.name) + ', "arguments": ')
        rules.append(f"call_{n}: {head} args_{n} call_id? \"}}\"")
        rules.append(f"args_{n}: %json {json.dumps(arguments_schema(function), ensure_ascii=False)}")
    calls = "call ((\", \" call){0,%d})" % (MAX_CALLS - 1) if parallel else "call"
    return "\n".join([
        f"start: <[{marker_id}]> \" [\" {calls} \"]\"",
        "call: " + " | ".join(f"call_{n}" for n in range(len(functions))),
        *rules,
        'call_id: ", \\"id\\": \\"" /[a-zA-Z0-9]{9}/ "\\""',
    ]) + "\n"
