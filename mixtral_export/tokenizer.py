"""The checkpoint's sentencepiece tokenizer.model (byte-fallback BPE, as Mistral/Mixtral ship it),
with an exact round trip, streaming detokenisation and the Mixtral-Instruct chat format.

Only sentencepiece's protobuf is read; nothing is unpickled.
"""
from __future__ import annotations

import codecs
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from mixtral_export.errors import UserError

SPACE = "\u2581"  # sentencepiece's whitespace symbol "▁"
# A ModelProto field 3 (normalizer_spec) holding add_dummy_prefix=false. Protobuf merges repeated
# embedded messages, so appending these bytes to a model switches its dummy prefix off.
NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"

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


class TokenizerError(UserError, ValueError):
    """A tokenizer.model that is missing or unreadable."""


class ChatFormatError(UserError, ValueError):
    """A conversation the Mixtral-Instruct template cannot render."""


class Tokenizer:
    """A sentencepiece model; build it with Tokenizer.from_file."""

    def __init__(self, model_proto: bytes, path: Path):
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
            # For text that follows a literal "▁" (see encode).
            self.sp_no_prefix = spm.SentencePieceProcessor(model_proto=model_proto + NO_DUMMY_PREFIX)
        except Exception as exc:
            raise TokenizerError(f"{path}: not a valid sentencepiece model ({type(exc).__name__})") from None
        if self.sp.get_piece_size() == 0 or self.sp.bos_id() < 0 or self.sp.eos_id() < 0:
            raise TokenizerError(f"{path}: sentencepiece model has no vocabulary or no <s>/</s> tokens")
        self.dummy_prefix = self.sp.normalize("a").startswith(SPACE)
        # Byte pieces of a literal "▁" (empty without byte fallback: then "▁" decodes as a space).
        self.space_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE.encode("utf-8")]
        if not all(self.sp.is_byte(i) for i in self.space_ids):
            self.space_ids = []
        # Per id: the bytes it decodes to (None: dropped) and whether it is a byte-fallback piece.
        self.piece_bytes: list[bytes | None] = []
        self.is_byte: list[bool] = []
        for i in range(self.sp.get_piece_size()):
            piece = self.sp.id_to_piece(i)
            if self.sp.is_byte(i):
                self.piece_bytes.append(bytes([int(piece[1:-1], 16)]))
            elif self.sp.is_control(i) or self.sp.is_unknown(i) or self.sp.is_unused(i):
                self.piece_bytes.append(None)
            else:
                self.piece_bytes.append(piece.replace(SPACE, " ").encode("utf-8"))
            self.is_byte.append(self.sp.is_byte(i))

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.model, or the tokenizer.model inside a checkpoint folder."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise TokenizerError(f"tokenizer model not found: {path}")
        return cls(path.read_bytes(), path)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        """The model's pad id when it has one; Mistral/Mixtral models have none, so eos id."""
        return self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`, as sentencepiece encodes it.

        One exception, for the round trip: sentencepiece reads a literal "▁" (U+2581) in the
        text as a space, so each one is encoded as its three UTF-8 byte pieces instead.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        first, *rest = text.split(SPACE) if self.space_ids else [text]
        ids = [self.bos_id] if bos else []
        ids += self.sp.encode(first)
        for part in rest:
            ids += self.space_ids + self.sp_no_prefix.encode(part)
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`: control tokens and <unk> dropped, byte pieces joined into UTF-8, and the
        dummy-prefix space of the first piece removed (as sentencepiece does)."""
        stream = self.stream_decoder()
        return "".join(stream.push(i) for i in ids) + stream.flush()

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def batch_encode(self, texts: Sequence[str], bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded int64 ids (B, N) filled with pad_id, and a bool mask (B, N) of real tokens."""
        rows = [self.encode(t, bos=bos) for t in texts]
        width = max((len(r) for r in rows), default=0)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=bool)
        for b, row in enumerate(rows):
            if row:
                ids[b, width - len(row):] = row
                mask[b, width - len(row):] = True
        return ids, mask

    def encode_chat(self, messages: Sequence[Mapping], for_generation: bool = True) -> list[int]:
        """Ids of a Mixtral-Instruct conversation: <s>, then "[INST] user [/INST]" per user turn
        and "answer" + </s> per assistant turn.

        Each segment between special tokens is sentencepiece-encoded on its own (so each gets the
        dummy-prefix space), as mistral-common's v1 instruct tokenizer and Mistral's reference code
        do. Tokenizing the rendered string with HF instead keeps " [/INST]" and the answer that
        follows it in one segment, so ids at that seam can differ.
        """
        check_chat(messages, for_generation)
        ids = [self.bos_id]
        for message in messages:
            if message["role"] == "user":
                ids += self.encode(f"[INST] {message['content']} [/INST]", bos=False)
            else:
                ids += self.encode(message["content"], bos=False) + [self.eos_id]
        return ids


class StreamDecoder:
    """Incremental decode: push(id) returns only completed text, never half a UTF-8 character;
    all pushes plus flush() equal Tokenizer.decode of the same ids."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.at_start = tokenizer.dummy_prefix  # the next visible piece may carry the dummy prefix

    def push(self, token_id: int) -> str:
        tok = self.tokenizer
        if not 0 <= token_id < tok.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (size {tok.vocab_size})")
        data = tok.piece_bytes[token_id]
        if data is None:
            return ""
        if self.at_start and not tok.is_byte[token_id] and data.startswith(b" "):
            data = data[1:]
        self.at_start = False
        return self.utf8.decode(data)

    def flush(self) -> str:
        """Text still held back (an incomplete character becomes U+FFFD)."""
        return self.utf8.decode(b"", final=True)


def check_chat(messages: Sequence[Mapping], for_generation: bool = True) -> None:
    """Raise ChatFormatError unless `messages` alternate user/assistant starting with user (and,
    for generation, end with a user turn)."""
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
    check_chat(messages, for_generation)
    parts = [bos_token]
    for message in messages:
        if message["role"] == "user":
            parts.append("[INST] " + message["content"] + " [/INST]")
        else:
            parts.append(message["content"] + eos_token)
    return "".join(parts)
