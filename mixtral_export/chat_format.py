"""The Mistral-Instruct chat formats of Mixtral's tokenizers, written as mistral-common writes them.

v1 (Mixtral-8x7B): "[INST] ... [/INST]" is text; a system prompt opens the first user turn.
v2/v3 (Mixtral-8x22B ships v3): [INST] and [/INST] are control tokens; a system prompt opens the
last user turn; an answer loses its trailing spaces. For user/assistant/system text the two agree.

A conversation is checked and normalised first, as mistral-common's request validator and
normaliser do, so the ids equal its encode_chat_completion; what it refuses, and what we cannot
encode faithfully (tools, images, extra message fields), raises ChatFormatError.
CHAT_TEMPLATE / render_chat are the Hugging Face template of the original 8x7B-Instruct, kept to
compare against (see docs/runtimes.md, "Chat format").
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mixtral_export.errors import UserError

JOIN = "\n\n"  # mistral-common joins merged turns, and a system prompt to its user turn, with this
ROLES = ("user", "assistant", "system")
# Roles mistral-common accepts after each role (a system message never follows an answer).
NEXT_ROLES = {"system": {"user", "assistant", "system"}, "user": {"user", "assistant", "system"},
              "assistant": {"user", "assistant"}}


class ChatFormatError(UserError, ValueError):
    """A conversation the Mixtral-Instruct format cannot encode, or one mistral-common refuses."""


@dataclass(frozen=True)
class Control:
    """A control token, by its piece (e.g. "[INST]"), among the text segments of a chat."""
    piece: str


@dataclass(frozen=True)
class Conversation:
    """A normalised conversation: (role, content) turns of "user" and "assistant" starting with
    "user" (two user turns may meet where a system message stood between them), and the system
    prompt (None when there is none)."""
    turns: tuple[tuple[str, str], ...]
    system: str | None


def normalize_chat(messages: Sequence[Mapping], for_generation: bool = True) -> Conversation:
    """Check `messages` as mistral-common does, then merge them as it does: consecutive turns of
    one role joined by a blank line, system messages pulled out into one prompt, and an empty user
    turn put first when the conversation would not start with one.

    for_generation: the conversation may not end with an answer (mistral-common's "test"/"serving"
    validation); without it any last message is fine ("agnostic").
    """
    check_messages(messages, for_generation)
    system = [m["content"] for m in messages if m["role"] == "system" and m["content"]]
    turns: list[list[str]] = []  # [role, content] of each run of one role
    previous = None
    for message in messages:
        role, content = message["role"], message["content"]
        if role != previous:
            turns.append([role, content])
        elif content:  # mistral-common skips empty contents when merging
            turns[-1][1] = turns[-1][1] + JOIN + content if turns[-1][1] else content
        previous = role
    merged = tuple((role, content) for role, content in turns if role != "system")
    if not merged or merged[0][0] != "user":
        merged = (("user", ""),) + merged
    return Conversation(merged, JOIN.join(system) if system else None)


def check_messages(messages: Sequence[Mapping], for_generation: bool = True) -> None:
    """Raise ChatFormatError, naming the message, for what mistral-common's v1-v3 validator refuses
    and for what we do not encode (tool calls and results, images, other message fields)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ChatFormatError("empty conversation: need a list of messages with at least one user message")
    for n, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ChatFormatError(f"message {n} must be a mapping with 'role' and 'content'")
        extra = sorted(str(key) for key in message if key not in ("role", "content"))
        if extra:
            raise ChatFormatError(f"message {n} has {extra[0]!r}: only 'role' and 'content' are supported "
                                  "(no tool calls, names or prefixes)")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ChatFormatError(f"message {n} has role {role!r}: only 'user', 'assistant' and 'system' "
                                  "are supported (no tool messages)")
        if not isinstance(content, str):
            raise ChatFormatError(f"message {n} content must be a str, got {type(content).__name__} "
                                  "(content parts such as images are not supported)")
        if role == "assistant" and not content:
            raise ChatFormatError(f"message {n} is an empty assistant message: an answer needs content")
        if n and role not in NEXT_ROLES[messages[n - 1]["role"]]:
            raise ChatFormatError(f"message {n} is {role!r} after 'assistant': "
                                  "a system message may not follow an answer")
    if len(messages) == 1 and messages[0]["role"] == "assistant":
        raise ChatFormatError("message 0 is 'assistant': a conversation starts with a user or system message")
    if for_generation and len(messages) > 1 and messages[-1]["role"] == "assistant":
        raise ChatFormatError("a conversation for generation must not end with an assistant message")


def chat_segments(conversation: Conversation, version: str) -> list[str | Control]:
    """The conversation as control tokens and text segments, each segment to be sentencepiece-encoded
    on its own (so each gets the dummy-prefix space), in the format of tokenizer `version`."""
    if version not in ("v1", "v2", "v3"):
        raise ChatFormatError(f"instruct format {version} is not supported (v1, v2 and v3 are)")
    users = [n for n, (role, _) in enumerate(conversation.turns) if role == "user"]
    system_at = users[0] if version == "v1" else users[-1]
    out: list[str | Control] = [Control("<s>")]
    for n, (role, content) in enumerate(conversation.turns):
        if role == "user":
            if n == system_at and conversation.system:
                content = conversation.system + JOIN + content
            out += [f"[INST] {content} [/INST]"] if version == "v1" else [Control("[INST]"), content,
                                                                             Control("[/INST]")]
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
