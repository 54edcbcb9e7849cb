"""OpenAI's tool fields on /v1/chat/completions: `tools`, `tool_choice`, `parallel_tool_calls` checked
into a ToolRequest, and the model's tool call answer written as OpenAI's `tool_calls` (whole, or as
streamed deltas).

`tool_choice` "auto" (the default with tools) lets the model answer with text or [TOOL_CALLS];
"none" (the default without) reads any [TOOL_CALLS] it writes as text; "required" and a named
function constrain it with a grammar (serving/tool_grammar.py) to call some function, or that
one. What the model writes after [TOOL_CALLS] that is no valid list of calls comes back as plain
content (mixtral_export/tool_call_parser.py).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mixtral_export.chat_format import TOOL_VERSIONS
from mixtral_export.tool_call_parser import ParsedCall, ToolAnswer, read_answer
from mixtral_export.tool_calls import Function, ToolFormatError, check_tools
from mixtral_export.serving.tool_grammar import tool_call_grammar

CHOICES = ("auto", "none", "required")
MARKER = "[TOOL_CALLS]"


@dataclass(frozen=True)
class ToolRequest:
    functions: tuple[Function, ...]
    choice: str  # "auto" | "none" | "required" | "function" (the one named in `named`)
    parallel: bool = True  # more than one call per answer
    named: str | None = None

    @property
    def calls_allowed(self) -> bool:
        return self.choice != "none" and bool(self.functions)

    def grammar(self, marker_id: int) -> str | None:
        """The grammar that forces a call ("required", a named function); None for "auto" and "none"."""
        if self.choice == "required":
            return tool_call_grammar(self.functions, marker_id, self.parallel)
        if self.choice == "function":
            return tool_call_grammar([f for f in self.functions if f.name == self.named][:1], marker_id, self.parallel)
        return None


def tool_request(body: Mapping) -> ToolRequest | None:
    """The request's tool fields checked (ToolFormatError naming the field); None when it has none."""
    tools, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    if tools is None and choice is None and parallel is None:
        return None
    functions = check_tools(tools)
    if parallel is not None and not isinstance(parallel, bool):
        raise ToolFormatError(f"'parallel_tool_calls' must be a boolean, got {parallel!r}", "parallel_tool_calls")
    parallel = True if parallel is None else parallel
    if choice is None:
        return ToolRequest(functions, "auto" if functions else "none", parallel)
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise ToolFormatError(f"'tool_choice' is {choice!r}: use 'auto', 'none', 'required' or "
                                  "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
        if choice == "required" and not functions:
            raise ToolFormatError("'tool_choice' 'required' needs 'tools'", "tool_choice")
        return ToolRequest(functions, choice, parallel)
    if not isinstance(choice, Mapping) or not isinstance(choice.get("function"), Mapping) \
            or set(choice) - {"type", "function"} or set(choice["function"]) - {"name"}:
        raise ToolFormatError("'tool_choice' must be 'auto', 'none', 'required' or "
                              "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    if choice.get("type", "function") != "function":
        raise ToolFormatError(f"'tool_choice' has type {choice.get('type')!r}: only 'function'", "tool_choice")
    name = choice["function"].get("name")
    if name not in {f.name for f in functions}:
        raise ToolFormatError(f"'tool_choice' names function {name!r}, which is not in 'tools' "
                              f"({', '.join(f.name for f in functions) or 'none given'})", "tool_choice")
    return ToolRequest(functions, "function", parallel, name)


def writes_tools(tokenizer) -> bool:
    """The tokenizer's chat format carries tools (v3: mixtral_export/chat_format.py)."""
    return tokenizer is not None and tokenizer.instruct_version in TOOL_VERSIONS and marker_id(tokenizer) is not None


def marker_id(tokenizer) -> int | None:
    """The tokenizer's [TOOL_CALLS] control token, None when it has none (v1)."""
    return None if tokenizer is None else tokenizer.control_id(MARKER)


def tool_answer(token_ids, tokenizer, tools: ToolRequest | None) -> ToolAnswer | None:
    """The completion's tool calls, or None: no tools allowed, no [TOOL_CALLS], or no valid calls after it."""
    if tools is None or not tools.calls_allowed:
        return None
    return read_answer(token_ids, tokenizer.decode, marker_id(tokenizer), {f.name for f in tools.functions},
                       tools.parallel)


def call_json(call: ParsedCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def message(answer: ToolAnswer) -> dict:
    """The assistant message of a tool call answer (content null when the answer opened with the calls)."""
    return {"role": "assistant", "content": answer.content or None, "tool_calls": [call_json(c) for c in answer.calls]}


def call_deltas(answer: ToolAnswer) -> list[dict]:
    """The streamed deltas of the calls: one per call, each whole (its id, name and all its arguments)."""
    return [{"tool_calls": [{"index": n, **call_json(call)}]} for n, call in enumerate(answer.calls)]


class ToolCallHold:
    """A stream's events from its first [TOOL_CALLS] token on, held back: whether they are tool calls
    or plain text is known only once the answer is complete."""

    def __init__(self, marker: int | None):
        self.marker, self.held = marker, []

    def pass_on(self, events: list) -> list:
        """The events to send now; the rest are held (in `held`)."""
        for n, event in enumerate(events):
            if self.held or event.token_id == self.marker:
                self.held += events[n:]
                return events[:n]
        return events
