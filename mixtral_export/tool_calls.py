"""Function tools, tool calls and tool results in the Mistral v3 format, checked and written as
mistral-common checks and writes them (its v3 validator, normaliser and InstructTokenizerV3).

OpenAI shapes in, the JSON texts the v3 chat format encodes out: the [AVAILABLE_TOOLS] list, an
assistant's [TOOL_CALLS] list and a [TOOL_RESULTS] object. Names match ^[a-zA-Z0-9_-]{1,64}$, tool
call ids ^[a-zA-Z0-9]{9}$ (v3's rule); `new_call_id` makes such an id for a call the model wrote.
Fields we would not encode are refused, naming them, rather than dropped.
"""
from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mixtral_export.errors import UserError

NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
NULL_ID = "null"  # mistral-common's id of a call that has none (allowed only when scoring, in the last message)
ID_ALPHABET = string.ascii_letters + string.digits
FUNCTION_FIELDS = ("name", "description", "parameters", "strict")


class ToolFormatError(UserError, ValueError):
    """A tool definition, tool call or tool result the v3 format refuses; `param` names the request field."""

    def __init__(self, message: str, param: str = "tools"):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Function:
    """A function tool: its name, description, JSON-schema `parameters` and OpenAI's `strict` flag."""
    name: str
    description: str
    parameters: dict
    strict: bool = False


@dataclass(frozen=True)
class ToolCall:
    """One call of an assistant message: its id ("null" when it has none) and normalised arguments."""
    id: str
    name: str
    arguments: str  # JSON text as mistral-common normalises it (or the given text when it is not JSON)


def check_tools(tools) -> tuple[Function, ...]:
    """OpenAI's `tools` ([{"type": "function", "function": {...}}]) checked into Functions: a
    non-function type, an unknown field, a bad name or a parameters object that is not a Draft 7
    JSON schema raises ToolFormatError naming it."""
    if tools is None:
        return ()
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise ToolFormatError("'tools' must be a list of {\"type\": \"function\", \"function\": {...}}")
    out = []
    for n, tool in enumerate(tools):
        where = f"tools[{n}]"
        if not isinstance(tool, Mapping):
            raise ToolFormatError(f"{where} must be an object")
        unknown = sorted(str(k) for k, v in tool.items() if k not in ("type", "function") and v is not None)
        if unknown:
            raise ToolFormatError(f"{where} has '{unknown[0]}': a tool has only 'type' and 'function'")
        if tool.get("type", "function") != "function":
            raise ToolFormatError(f"{where} has type {tool.get('type')!r}: only 'function' tools are supported")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise ToolFormatError(f"{where}.function must be an object with a 'name'")
        unknown = sorted(str(k) for k, v in function.items() if k not in FUNCTION_FIELDS and v is not None)
        if unknown:
            raise ToolFormatError(f"{where}.function has '{unknown[0]}': a function has only "
                                  f"{', '.join(map(repr, FUNCTION_FIELDS))}")
        name = check_name(function.get("name"), f"{where}.function.name", "tools")
        description = function.get("description") or ""
        parameters = function.get("parameters")
        parameters = {} if parameters is None else parameters
        strict = function.get("strict") or False
        if not isinstance(description, str):
            raise ToolFormatError(f"{where}.function.description must be a string")
        if not isinstance(parameters, dict):
            raise ToolFormatError(f"{where}.function.parameters must be a JSON schema object")
        if not isinstance(strict, bool):
            raise ToolFormatError(f"{where}.function.strict must be a boolean")
        check_schema(parameters, f"{where}.function.parameters")
        out.append(Function(name, description, parameters, strict))
    return tuple(out)


def check_schema(schema: dict, where: str) -> None:
    """A Draft 7 JSON schema, as mistral-common requires of a function's parameters."""
    import jsonschema  # lazy: only tool requests need it

    try:
        jsonschema.Draft7Validator.check_schema(schema)
    except jsonschema.exceptions.SchemaError as error:
        raise ToolFormatError(f"{where} is not a valid JSON schema: {error.message}") from None


def check_name(name, where: str, param: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise ToolFormatError(f"{where} is {name!r}: a function name is 1 to 64 of a-z, A-Z, 0-9, '_' and '-'",
                              param)
    return name


def check_call_id(call_id, where: str, allow_null: bool = False) -> str:
    """A client's tool call id under v3's rule (9 of a-z, A-Z, 0-9); "null" only where `allow_null`."""
    if call_id == NULL_ID and allow_null:
        return call_id
    if not isinstance(call_id, str) or not CALL_ID.match(call_id):
        raise ToolFormatError(f"{where} is {call_id!r}: a tool call id is 9 characters of a-z, A-Z, 0-9 "
                              "(as this model's tokenizer, v3, requires)", "messages")
    return call_id


def new_call_id() -> str:
    """A fresh tool call id that v3's rule accepts."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(9))


def check_tool_calls(calls, where: str, allow_null_id: bool) -> tuple[ToolCall, ...]:
    """An assistant message's OpenAI `tool_calls` checked into ToolCalls (arguments normalised)."""
    if not isinstance(calls, Sequence) or isinstance(calls, (str, bytes)):
        raise ToolFormatError(f"{where} must be a list of tool calls", "messages")
    out = []
    for n, call in enumerate(calls):
        at = f"{where}[{n}]"
        if not isinstance(call, Mapping):
            raise ToolFormatError(f"{at} must be an object", "messages")
        unknown = sorted(str(k) for k, v in call.items() if k not in ("id", "type", "function") and v is not None)
        if unknown:
            raise ToolFormatError(f"{at} has '{unknown[0]}': a tool call has 'id', 'type' and 'function'", "messages")
        if call.get("type", "function") not in ("function", None):
            raise ToolFormatError(f"{at} has type {call.get('type')!r}: only 'function' calls exist", "messages")
        function = call.get("function")
        if not isinstance(function, Mapping) or not set(function) <= {"name", "arguments"}:
            raise ToolFormatError(f"{at}.function must be an object with 'name' and 'arguments'", "messages")
        name = check_name(function.get("name"), f"{at}.function.name", "messages")
        arguments = function.get("arguments")
        if isinstance(arguments, dict):
            arguments = json.dumps(arguments)
        elif arguments is not None and not isinstance(arguments, str):
            raise ToolFormatError(f"{at}.function.arguments must be a JSON string", "messages")
        call_id = check_call_id(call.get("id", NULL_ID) or NULL_ID, f"{at}.id", allow_null_id)
        out.append(ToolCall(call_id, name, normalize_json(arguments)))
    return tuple(out)


def normalize_json(text: str | None) -> str:
    """mistral-common's normalisation of arguments and tool results: empty -> "{}", JSON re-dumped
    compactly as json.dumps writes it, anything else kept as it is."""
    if not text:
        return "{}"
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except json.JSONDecodeError:
        return text


def parsed(text: str) -> Any:
    """The JSON value of normalised text, or the text itself when it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def tools_text(functions: Sequence[Function]) -> str:
    """The [AVAILABLE_TOOLS] body: each tool as mistral-common dumps it (without `strict`)."""
    return json.dumps([{"type": "function", "function": {"name": f.name, "description": f.description,
                                                          "parameters": f.parameters}} for f in functions],
                      ensure_ascii=False)


def calls_text(calls: Sequence[ToolCall]) -> str:
    """The [TOOL_CALLS] body of an assistant message."""
    out = []
    for call in calls:
        entry = {"name": call.name, "arguments": parsed(call.arguments)}
        if call.id != NULL_ID:
            entry["id"] = call.id
        out.append(entry)
    return json.dumps(out, ensure_ascii=False)


def result_text(content: str, call_id: str) -> str:
    """The [TOOL_RESULTS] body of a tool message."""
    return json.dumps({"content": parsed(normalize_json(content)), "call_id": call_id}, ensure_ascii=False)
