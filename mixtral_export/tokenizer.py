"""The checkpoint's sentencepiece tokenizer.model (byte-fallback BPE, as Mistral/Mixtral ship it):
encode and decode exactly as sentencepiece (and so mistral-common) do, streaming detokenisation, and
the Mistral-Instruct chat format of the model's version (see chat_format.py).

Only sentencepiece's protobuf is read; nothing is unpickled.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from mixtral_export.chat_format import (  # noqa: F401  (ChatFormatError is part of this module's API)
    ChatFormatError, Control, chat_segments, normalize_chat,
)
from mixtral_export.errors import UserError
from mixtral_export.tool_calls import Function

SPACE = "\u2581"  # sentencepiece's whitespace symbol "▁"
BYTE, CONTROL, UNKNOWN, TEXT = range(4)  # what a piece decodes as


class TokenizerError(UserError, ValueError):
    """A tokenizer.model that is missing or unreadable."""


def instruct_version(sp: spm.SentencePieceProcessor) -> str:
    """The Mistral-Instruct format a model was made for, read from its control pieces (mistral-common
    names the same versions by file suffix): v1 has none but <s>/</s> ("[INST]" is text); v2 made
    [INST], [/INST] and the tool markers control pieces; v3 added [IMG] and the fill-in-the-middle
    markers; v7 added [SYSTEM_PROMPT]."""
    control = {sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i)}
    if "[INST]" not in control:
        return "v1"
    if "[SYSTEM_PROMPT]" in control:
        return "v7"
    return "v3" if "[IMG]" in control else "v2"


class Tokenizer:
    """A sentencepiece model; build it with Tokenizer.from_file."""

    def __init__(self, model_proto: bytes, path: Path):
        self.path, self.model_proto = path, model_proto
        self._verbatim: spm.SentencePieceProcessor | None = None
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except Exception as exc:
            raise TokenizerError(f"{path}: not a valid sentencepiece model ({type(exc).__name__})") from None
        if self.sp.get_piece_size() == 0 or self.sp.bos_id() < 0 or self.sp.eos_id() < 0:
            raise TokenizerError(f"{path}: sentencepiece model has no vocabulary or no <s>/</s> tokens")
        self.instruct_version = instruct_version(self.sp)
        # Decoding drops a leading "▁" of the text's first piece (the dummy prefix) when the model adds
        # one or squeezes whitespace; squeezing models drop it from every piece until text appears.
        self.strips_leading_space = self.sp.normalize("a").startswith(SPACE)
        self.squeezes_spaces = self.sp.normalize(" a  b ") == self.sp.normalize("a b")
        self.strips_leading_space |= self.squeezes_spaces
        self.unk_surface = self.sp.decode([self.sp.unk_id()]) if self.sp.unk_id() >= 0 else ""
        # Per id: how it decodes, and its byte (byte pieces) or its piece (the others).
        self.kind: list[int] = []
        self.piece: list[str | int] = []
        for i in range(self.sp.get_piece_size()):
            piece = self.sp.id_to_piece(i)
            if self.sp.is_byte(i):
                self.kind.append(BYTE)
                self.piece.append(int(piece[1:-1], 16))
            else:
                self.kind.append(CONTROL if self.sp.is_control(i) else UNKNOWN if self.sp.is_unknown(i) else TEXT)
                self.piece.append(piece)

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

    def control_id(self, piece: str) -> int | None:
        """The id of the control token `piece` (e.g. "[TOOL_CALLS]"), None when the model has none."""
        token = self.sp.piece_to_id(piece)
        return token if self.kind[token] == CONTROL and self.sp.id_to_piece(token) == piece else None

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`, exactly as sentencepiece (and mistral-common) encode it: a literal "▁"
        (U+2581) reads as a space, and control pieces written as text ("[INST]", "</s>") stay text."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = [self.bos_id] if bos else []
        ids += self.sp.encode(text)
        return ids + [self.eos_id] if eos else ids

    def token_bytes(self, token_id: int) -> bytes | None:
        """The UTF-8 bytes a token stands for inside text ("▁" as a space, a byte piece as its byte);
        None for a control or unknown piece, which is no text."""
        kind, piece = self.kind[token_id], self.piece[token_id]
        if kind == BYTE:
            return bytes([piece])
        return piece.replace(SPACE, " ").encode() if kind == TEXT else None

    def encode_verbatim(self, text: str | bytes) -> list[int]:
        """Ids whose token_bytes concatenate to exactly `text`: sentencepiece's encoding without the
        dummy-prefix space and without whitespace squeezing (a grammar's forced text, mid-output)."""
        if self._verbatim is None:
            from sentencepiece import sentencepiece_model_pb2  # protobuf: only this use needs it

            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(self.model_proto)
            proto.normalizer_spec.add_dummy_prefix = False
            proto.normalizer_spec.remove_extra_whitespaces = False
            self._verbatim = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        return self._verbatim.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, exactly as sentencepiece (and mistral-common) decode them: control tokens
        dropped, <unk> as " ⁇ ", each run of byte pieces read as UTF-8 with every byte of a broken
        character as U+FFFD, and the dummy-prefix space of the first piece removed."""
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

    def encode_chat(self, messages: Sequence[Mapping], for_generation: bool = True,
                    tools: Sequence[Function] = ()) -> list[int]:
        """Ids of a Mistral-Instruct conversation of "user", "assistant", "system" and "tool" messages
        in this model's format (instruct_version), with the function `tools` (checked by
        tool_calls.check_tools) available, equal to mistral-common's encode_chat_completion.

        Each text segment between control tokens is sentencepiece-encoded on its own (so each gets
        the dummy-prefix space), as mistral-common does. Tokenizing a chat template's rendered
        string in one go instead can give other ids at the seams (docs/runtimes.md, "Chat format").
        for_generation: the conversation may not end with an assistant message.
        """
        if self.instruct_version not in ("v1", "v2", "v3"):
            raise ChatFormatError(f"{self.path}: instruct format {self.instruct_version} is not supported "
                                  "(Mixtral's v1 and v3 are)")
        ids: list[int] = []
        for segment in chat_segments(normalize_chat(messages, for_generation, tools),
                                     self.instruct_version):
            ids += [self.sp.piece_to_id(segment.piece)] if isinstance(segment, Control) else self.sp.encode(segment)
        return ids


class StreamDecoder:
    """Incremental decode: push(id) returns only completed text, never part of a UTF-8 character;
    all pushes plus flush() equal Tokenizer.decode of the same ids, which equals sentencepiece's.

    Follows sentencepiece's Decode: a run of byte pieces is read one character at a time, a byte
    that does not start a valid character becoming U+FFFD; any other piece ends the run.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.pending = bytearray()  # bytes of the current byte-piece run not yet emitted
        self.at_start = tokenizer.strips_leading_space  # a piece's leading "▁" is the dummy prefix
        self.stripped = False  # the previous piece had its leading "▁" removed
        self.emitted = False  # any text so far

    def push(self, token_id: int) -> str:
        tok = self.tokenizer
        if not 0 <= token_id < tok.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (size {tok.vocab_size})")
        kind, piece = tok.kind[token_id], tok.piece[token_id]
        if kind == BYTE:
            self.pending.append(piece)
            return self._take(final=False)
        text = self._take(final=True)
        if self.stripped or self.emitted:
            self.at_start = False
        self.stripped = False
        if kind == UNKNOWN:
            text += tok.unk_surface
        elif kind == TEXT:
            if self.at_start and piece.startswith(SPACE):
                piece = piece[1:]
                self.stripped = not tok.squeezes_spaces
            text += piece.replace(SPACE, " ")
        self.emitted |= bool(text)
        return text

    def flush(self) -> str:
        """Text still held back (each byte of an incomplete character becomes U+FFFD)."""
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        """Characters decoded from the front of the pending bytes; an incomplete character stays
        pending unless `final` (the run has ended) or a byte already breaks it."""
        out = []
        pending = self.pending
        while pending:
            lead = pending[0]
            size = 1 if lead < 0x80 else 2 if lead >> 5 == 6 else 3 if lead >> 4 == 14 else 4 if lead >> 3 == 30 else 0
            if not final and len(pending) < size and all(b >> 6 == 2 for b in pending[1:]):
                break  # wait for the rest of the character
            try:
                char = bytes(pending[:size]).decode("utf-8") if 0 < size <= len(pending) else None
            except UnicodeDecodeError:
                char = None
            out.append("\ufffd" if char is None else char)
            del pending[:1 if char is None else size]
        text = "".join(out)
        self.emitted |= bool(text)
        return text
