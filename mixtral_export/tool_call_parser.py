"""Read a v3 model's tool calls out of what it generated: `[TOOL_CALLS]` (a control token) followed
by the JSON list mistral-common writes, [{"name": ..., "arguments": {...}}, ...].

The model's answer is split at its first [TOOL_CALLS] token: the text before it is content, the text
after it must be a non-empty JSON list of calls to known functions (a lone call object is taken as a
list of one; an "id" the model wrote is ignored: each call gets a fresh id), at most one call where
parallel calls are off. Anything else is not a tool call answer, and the caller falls back to the
whole text as plain content (`parse_tool_calls` returns None).
"""
from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from mixtral_export.tool_calls import new_call_id


@dataclass(frozen=True)
class ParsedCall:
    """A call the model wrote: a fresh id, the function's name, its arguments as JSON text."""
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolAnswer:
    content: str  # the text before [TOOL_CALLS] ("" when the answer opens with it)
    calls: tuple[ParsedCall, ...]


def split_at_marker(token_ids: Sequence[int], marker_id: int) -> tuple[list[int], list[int]] | None:
    """(ids before, ids after) the first [TOOL_CALLS] token, or None when there is none."""
    for n, token in enumerate(token_ids):
        if token == marker_id:
            return list(token_ids[:n]), list(token_ids[n + 1:])
    return None


def parse_tool_calls(text: str, names: Collection[str], parallel: bool = True) -> tuple[ParsedCall, ...] | None:
    """The calls in `text` (what followed [TOOL_CALLS]), or None when it is not a valid list of calls
    to functions in `names` (at most one call unless `parallel`)."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    entries = [value] if isinstance(value, dict) else value
    if not isinstance(entries, list) or not entries or (len(entries) > 1 and not parallel):
        return None
    calls = []
    for entry in entries:
        if not isinstance(entry, dict) or not set(entry) <= {"name", "arguments", "id"}:
            return None
        name, arguments = entry.get("name"), entry.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if name not in names or not isinstance(arguments, dict):
            return None
        calls.append(ParsedCall(new_call_id(), name, json.dumps(arguments, ensure_ascii=False)))
    return tuple(calls)


def read_answer(token_ids: Sequence[int], decode, marker_id: int | None, names: Collection[str],
                parallel: bool = True) -> ToolAnswer | None:
    """The tool call answer in a completion's ids (`decode` turns ids into text), or None when there
    is none: no marker, no tools, or what follows the marker is not a valid list of calls."""
    if marker_id is None or not names:
        return None
    parts = split_at_marker(token_ids, marker_id)
    if parts is None:
        return None
    calls = parse_tool_calls(decode(parts[1]), names, parallel)
    return None if calls is None else ToolAnswer(decode(parts[0]), calls)
