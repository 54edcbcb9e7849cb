"""The Mistral-Instruct chat formats of Mixtral's tokenizers, written as mistral-common writes them.

v1 (Mixtral-8x7B): "[INST] ... [/INST]" is text; a system prompt opens the first user turn.
v2/v3 (Mixtral-8x22B ships v3): [INST] and [/INST] are control tokens; a system prompt opens the
last user turn; an answer loses its trailing spaces. For user/assistant/system text the two agree.

A conversation is checked and normalised first, as mistral-common's request validator and
normaliser do, so the ids equal its encode_chat_completion; what it refuses, and what we cannot
encode faithfully (images, extra message fields), raises ChatFormatError. v3 also carries function
tools ([AVAILABLE_TOOLS] before the last user turn), an assistant's tool calls ([TOOL_CALLS] ...</s>)
and tool results ([TOOL_RESULTS] ... [/TOOL_RESULTS]), their JSON written by tool_calls.py; v1 has
no tool tokens and refuses them.
CHAT_TEMPLATE / render_chat are the Hugging Face template of the original 8x7B-Instruct, kept to
compare against (see docs/runtimes.md, "Chat format").
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mixtral_export.errors import UserError
from mixtral_export.tool_calls import (Function, calls_text, check_call_id, check_name, check_tool_calls,
                                         result_text, tools_text, ToolFormatError)

JOIN = "\n\n"  # mistral-common joins merged turns, and a system prompt to its user turn, with this
ROLES = ("user", "assistant", "system", "tool")
# Roles mistral-common accepts after each role (a system message never follows an answer or a tool result).
NEXT_ROLES = {"system": {"user", "assistant", "system"}, "user": {"user", "assistant", "system"},
              "assistant": {"user", "assistant", "tool"}, "tool": {"user", "assistant", "tool"}}
FIELDS = {"user": {"role", "content"}, "system": {"role", "content"}, "assistant": {"role", "content", "tool_calls"},
          "tool": {"role", "content", "tool_call_id", "name"}}
TOOL_VERSIONS = ("v3",)  # the formats whose tool markers we write (mistral-common's v2 writes tool results otherwise)


class ChatFormatError(UserError, ValueError):
    """A conversation the Mixtral-Instruct format cannot encode, or one mistral-common refuses."""


@dataclass(frozen=True)
class Control:
    """A control token, by its piece (e.g. "[INST]"), among the text segments of a chat."""
    piece: str


@dataclass(frozen=True)
class Conversation:
    """A normalised conversation: (kind, text) turns starting with "user" (two user turns may meet
    where a system message stood between them); kind is "user", "assistant", "calls" (an assistant's
    tool calls, text = the [TOOL_CALLS] JSON) or "result" (a tool message, text = the [TOOL_RESULTS]
    JSON). `system` is the system prompt and `tools` the [AVAILABLE_TOOLS] JSON (None when absent)."""
    turns: tuple[tuple[str, str], ...]
    system: str | None
    tools: str | None = None


def normalize_chat(messages: Sequence[Mapping], for_generation: bool = True,
                   tools: Sequence[Function] = ()) -> Conversation:
    """Check `messages` as mistral-common does, then merge them as it does: consecutive turns of
    one role joined by a blank line (an assistant's tool calls concatenated, tool results kept apart),
    system messages pulled out into one prompt, and an empty user turn put first when the conversation
    would not start with one.

    for_generation: the conversation may not end with an answer (mistral-common's "test"/"serving"
    validation); without it any last message is fine ("agnostic"). `tools`: checked Functions.
    """
    try:
        return conversation_of(messages, for_generation, tools)
    except ToolFormatError as error:
        raise ChatFormatError(str(error)) from None


def conversation_of(messages: Sequence[Mapping], for_generation: bool, tools: Sequence[Function]) -> Conversation:
    check_messages(messages, for_generation)
    system = [m["content"] for m in messages if m["role"] == "system" and m["content"]]
    groups: list[list[Mapping]] = []  # runs of one role
    for message in messages:
        if groups and groups[-1][0]["role"] == message["role"]:
            groups[-1].append(message)
        else:
            groups.append([message])
    turns: list[tuple[str, str]] = []
    for group in groups:
        role = group[0]["role"]
        if role == "tool":
            turns += [("result", result_text(m["content"], m["tool_call_id"])) for m in group]
        elif role == "assistant" and any(m.get("tool_calls") for m in group):
            if any(m.get("content") for m in group):
                raise ChatFormatError("consecutive assistant messages mix content and tool calls: "
                                      "an answer is either text or tool calls")
            calls = [call for m in group if m.get("tool_calls") for call in check_tool_calls(
                m["tool_calls"], f"message {index_of(messages, m)} tool_calls",
                allow_null_id=not for_generation and m is messages[-1])]  # an id-less call: scoring's last message
            turns.append(("calls", calls_text(calls)))
        elif role != "system":
            turns.append((role, JOIN.join(m["content"] for m in group if m["content"])))
    if not turns or turns[0][0] != "user":
        turns.insert(0, ("user", ""))
    return Conversation(tuple(turns), JOIN.join(system) if system else None,
                        tools_text(tools) if tools else None)


def index_of(messages: Sequence[Mapping], message: Mapping) -> int:
    return next(n for n, m in enumerate(messages) if m is message)


def check_messages(messages: Sequence[Mapping], for_generation: bool = True) -> None:
    """Raise ChatFormatError, naming the message, for what mistral-common's v3 validator refuses
    and for what we do not encode (images, other message fields)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ChatFormatError("empty conversation: need a list of messages with at least one user message")
    for n, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message \
                or ("content" not in message and message["role"] != "assistant"):
            raise ChatFormatError(f"message {n} must be a mapping with 'role' and 'content'")
        role, content = message["role"], message.get("content")
        if role not in ROLES:
            raise ChatFormatError(f"message {n} has role {role!r}: only 'user', 'assistant', 'system' and "
                                  "'tool' are supported")
        extra = sorted(str(key) for key in message if key not in FIELDS[role])
        if extra:
            raise ChatFormatError(f"message {n} has {extra[0]!r}: a {role} message has only "
                                  f"{', '.join(sorted(FIELDS[role]))}")
        if not isinstance(content, str) and not (role == "assistant" and content is None):
            raise ChatFormatError(f"message {n} content must be a str, got {type(content).__name__} "
                                  "(content parts such as images are not supported)")
        if role == "assistant" and bool(content) == bool(message.get("tool_calls")):
            raise ChatFormatError(f"message {n} is an empty assistant message: an answer needs content"
                                  if not content else
                                  f"message {n} has both content and tool_calls: an answer is one or the other")
        if role == "tool":
            if "tool_call_id" not in message:
                raise ChatFormatError(f"message {n} is a tool result without 'tool_call_id'")
            check_call_id(message["tool_call_id"], f"message {n} tool_call_id")
            if message.get("name") is not None:
                check_name(message["name"], f"message {n} name", "messages")
        if n and role not in NEXT_ROLES[messages[n - 1]["role"]]:
            raise ChatFormatError(f"message {n} is {role!r} after {messages[n - 1]['role']!r}: mistral-common "
                                  f"allows only {', '.join(sorted(NEXT_ROLES[messages[n - 1]['role']]))} there")
    if len(messages) == 1 and messages[0]["role"] not in ("user", "system"):
        raise ChatFormatError(f"message 0 is {messages[0]['role']!r}: a conversation starts with a user or "
                              "system message")
    if for_generation and len(messages) > 1 and messages[-1]["role"] == "assistant":
        raise ChatFormatError("a conversation for generation must not end with an assistant message")
    check_results_follow_calls(messages, for_generation)


def check_results_follow_calls(messages: Sequence[Mapping], for_generation: bool) -> None:
    """mistral-common's count rule: an assistant message's tool calls are answered by as many tool
    messages before the next assistant message (its rule skips the first message)."""
    expected = 0
    for n, message in enumerate(messages[1:], start=1):
        if message["role"] == "tool":
            expected -= 1
        elif message["role"] == "assistant":
            if expected:
                raise ChatFormatError(f"message {n}: the tool calls before it got {'more' if expected < 0 else 'fewer'} "
                                      "tool results than calls")
            expected = len(message.get("tool_calls") or ())


def chat_segments(conversation: Conversation, version: str) -> list[str | Control]:
    """The conversation as control tokens and text segments, each segment to be sentencepiece-encoded
    on its own (so each gets the dummy-prefix space), in the format of tokenizer `version`."""
    if version not in ("v1", "v2", "v3"):
        raise ChatFormatError(f"instruct format {version} is not supported (v1, v2 and v3 are)")
    uses_tools = conversation.tools is not None or any(kind in ("calls", "result") for kind, _ in conversation.turns)
    if uses_tools and version not in TOOL_VERSIONS:
        raise ChatFormatError(f"tools, tool calls and tool results need a tokenizer with tool tokens in the v3 "
                              f"format (Mixtral-8x22B's); this tokenizer is {version}"
                              + (" (Mixtral-8x7B's, no tool tokens)" if version == "v1" else ""))
    users = [n for n, (role, _) in enumerate(conversation.turns) if role == "user"]
    system_at = users[0] if version == "v1" else users[-1]
    out: list[str | Control] = [Control("<s>")]
    for n, (role, content) in enumerate(conversation.turns):
        if role == "user":
            if n == users[-1] and conversation.tools is not None:
                out += [Control("[AVAILABLE_TOOLS]"), conversation.tools, Control("[/AVAILABLE_TOOLS]")]
            if n == system_at and conversation.system:
                content = conversation.system + JOIN + content
            out += [f"[INST] {content} [/INST]"] if version == "v1" else [Control("[INST]"), content,
                                                                             Control("[/INST]")]
        elif role == "calls":
            out += [Control("[TOOL_CALLS]"), content, Control("</s>")]
        elif role == "result":
            out += [Control("[TOOL_RESULTS]"), content, Control("[/TOOL_RESULTS]")]
        else:
            out += [content if version == "v1" else content.rstrip(" "), Control("</s>")]
    return out


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)


def check_alternation(messages: Sequence[Mapping], for_generation: bool = True) -> None:
    """Raise ChatFormatError unless `messages` alternate user/assistant starting with user (and,
    for generation, end with a user turn): CHAT_TEMPLATE's rules."""
    if not messages:
        raise ChatFormatError("empty conversation: need at least one user message")
    for n, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ChatFormatError(f"message {n} must be a mapping with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ("user", "assistant"):
            raise ChatFormatError(f"message {n} has role {role!r}: only 'user' and 'assistant' are supported")
        expected = "user" if n % 2 == 0 else "assistant"
        if role != expected:
            raise ChatFormatError(f"message {n} is {role!r} but should be {expected!r}: "
                                  "roles must alternate user/assistant starting with user")
        if not isinstance(content, str):
            raise ChatFormatError(f"message {n} content must be a str, got {type(content).__name__}")
    if for_generation and messages[-1]["role"] != "user":
        raise ChatFormatError("a conversation for generation must end with a user message")


def render_chat(messages: Sequence[Mapping], bos_token: str = "<s>", eos_token: str = "</s>",
                for_generation: bool = True) -> str:
    """CHAT_TEMPLATE rendered in plain Python (stricter: an empty conversation is an error)."""
    check_alternation(messages, for_generation)
    parts = [bos_token]
    for message in messages:
        if message["role"] == "user":
            parts.append("[INST] " + message["content"] + " [/INST]")
        else:
            parts.append(message["content"] + eos_token)
    return "".join(parts)
