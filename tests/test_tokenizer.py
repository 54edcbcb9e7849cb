"""The sentencepiece tokenizer on the tiny model's trained tokenizer (v1 format, no control pieces):
sentencepiece's encode/decode, round trip, streaming, batching, chat format, training. The real Mixtral
tokenizers are tested against mistral-common in test_mistral_tokenizers.py."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from mixtral_export.chat_format import CHAT_TEMPLATE, render_chat
from mixtral_export.tokenizer import SPACE, ChatFormatError, Tokenizer, TokenizerError
from mixtral_export.tokenizer_training import load_tiny_corpus, train_tokenizer

TRICKY = [
    "", " ", "  ", "\n", "\t", "a", " a", "  a", "a ", "a  ", "  two  spaces  ",
    "Hello, world!", "line one\nline two\n", "\n\nleading newlines", "tabs\tand\t\ttabs",
    "\r\nwindows\r\n", "digits 0123456789 and 3.14159", "café crème brûlée, Zürich, São Paulo",
    "Ελληνικά λόγος", "日本語のテキスト", "你好，世界！", "emoji 🙂🚀🦀 and ❤️", " 🦀", "🦀",
    "e\u0301 combining accent", "zero\u200bwidth", "nul\x00byte", "literal \u2581 block",
    "\u2581", "\u2581\u2581x", "a\u2581b", "<s>[INST] not special [/INST]</s>", "<0x41>",
    "    def f(x):\n        return x ** 2\n",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(load_tiny_corpus(), folder / "tokenizer.model", vocab_size=1000)
    return folder


@pytest.fixture(scope="module")
def tok(model_dir) -> Tokenizer:
    return Tokenizer.from_file(model_dir / "tokenizer.model")


def chat(*contents: str) -> list[dict]:
    return [{"role": "user" if n % 2 == 0 else "assistant", "content": c} for n, c in enumerate(contents)]


def test_properties(tok, model_dir):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (1000, 1, 2)
    assert tok.pad_id == tok.eos_id  # no pad piece: pad with eos
    assert tok.path == model_dir / "tokenizer.model"
    assert tok.instruct_version == "v1"  # no [INST] control piece: the v1 chat format


def test_loads_from_checkpoint_folder(tok, model_dir):
    assert Tokenizer.from_file(model_dir).encode("hello") == tok.encode("hello")


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact(tok, text):
    # As in sentencepiece, a literal "▁" (U+2581) is read as a space: the one text that changes.
    assert tok.decode(tok.encode(text)) == text.replace(SPACE, " ")


def test_round_trip_of_corpus_lines(tok):
    lines = load_tiny_corpus().splitlines()
    assert all(tok.decode(tok.encode(line, eos=True)) == line for line in lines)


def test_encode_and_decode_match_sentencepiece(tok):
    for text in TRICKY:
        ids = tok.encode(text, bos=False)
        assert ids == tok.sp.encode(text)
        assert tok.decode(ids) == tok.sp.decode(ids)


def test_decode_matches_sentencepiece_on_random_ids(tok):
    """Byte runs cut by other pieces, broken UTF-8, <unk>, control tokens and leading spaces."""
    rng = random.Random(0)
    byte_ids = [i for i in range(tok.vocab_size) if tok.sp.is_byte(i)]
    special = [tok.bos_id, tok.eos_id, tok.sp.unk_id(), tok.sp.piece_to_id(SPACE)]
    for _ in range(3000):
        ids = [rng.choice(byte_ids) if r < 0.4 else rng.choice(special) if r < 0.6 else rng.randrange(tok.vocab_size)
               for r in (rng.random() for _ in range(rng.randrange(10)))]
        stream = tok.stream_decoder()
        streamed = "".join(stream.push(i) for i in ids) + stream.flush()
        assert tok.decode(ids) == streamed == tok.sp.decode(ids), ids


@pytest.mark.parametrize("data, between, text", [
    (b"\xf0\x9f\x41", None, "\ufffd\ufffdA"),  # each byte of a broken character is one U+FFFD
    (b"\xc3\xa9", "</s>", "\ufffd\ufffd"),    # a control token ends the byte run
    (b"\xed\xa0\x80", None, "\ufffd" * 3),     # a surrogate is not valid UTF-8
    (b"\xe2\x96\x81", None, SPACE),             # bytes of "▁" stay "▁"
])
def test_byte_pieces_decode_as_sentencepiece_does(tok, data, between, text):
    ids = [tok.sp.piece_to_id(f"<0x{b:02X}>") for b in data]
    if between:
        ids.insert(1, tok.sp.piece_to_id(between))
    assert tok.decode(ids) == tok.sp.decode(ids) == text


def test_bos_eos_flags(tok):
    body = tok.encode("hello", bos=False)
    assert body and tok.bos_id not in body and tok.eos_id not in body
    assert tok.encode("hello") == [tok.bos_id] + body
    assert tok.encode("hello", bos=True, eos=True) == [tok.bos_id] + body + [tok.eos_id]
    assert tok.encode("", bos=False, eos=False) == []


def test_decode_drops_control_tokens_and_shows_unk(tok):
    ids = [tok.bos_id] + tok.encode("hi there", bos=False) + [tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "hi there"
    assert tok.decode(ids + [tok.sp.unk_id()]) == "hi there \u2047 "  # sentencepiece's <unk> surface


def test_rare_character_uses_byte_fallback(tok):
    assert tok.sp.piece_to_id("🦀") == tok.sp.unk_id()
    pieces = [tok.sp.id_to_piece(i) for i in tok.encode("🦀", bos=False)]
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"]
    assert tok.sp.unk_id() not in tok.encode("🦀")


def test_batch_encode_left_pads_and_masks(tok):
    texts = ["a much longer sentence here", "hi", ""]
    ids, mask = tok.batch_encode(texts)
    rows = [tok.encode(t) for t in texts]
    assert ids.dtype == np.int64 and mask.dtype == np.bool_
    assert ids.shape == mask.shape == (3, len(rows[0]))
    for b, row in enumerate(rows):
        pad = ids.shape[1] - len(row)
        assert ids[b, pad:].tolist() == row and mask[b, pad:].all()
        assert (ids[b, :pad] == tok.pad_id).all() and not mask[b, :pad].any()


@pytest.mark.parametrize("text", ["Hello, world!", " leading space", "🦀 crab 日本語 é", "a\u2581b\n", ""])
def test_stream_decoder_concatenation_equals_decode(tok, text):
    ids = tok.encode(text, eos=True)
    stream = tok.stream_decoder()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tok.decode(ids) == text.replace(SPACE, " ")


def test_stream_decoder_holds_back_partial_characters(tok):
    ids = tok.encode("x🦀", bos=False)
    stream = tok.stream_decoder()
    pushed = [stream.push(i) for i in ids]
    assert pushed[-4:] == ["", "", "", "🦀"]
    assert stream.flush() == ""


def test_stream_decoder_flush_replaces_incomplete_character(tok):
    stream = tok.stream_decoder()
    assert stream.push(tok.sp.piece_to_id("<0xF0>")) == ""
    assert stream.flush() == "\ufffd"


def jinja_render(messages: list[dict]) -> str:
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(CHAT_TEMPLATE).render(messages=messages, bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("messages", [chat("Hi!"), chat("Hi!", " Hello.\n"), chat("Q1", "A1", "  Q2 ")])
def test_render_chat_matches_jinja(messages):
    assert render_chat(messages, for_generation=False) == jinja_render(messages)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "assistant", "content": "a"}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
])
def test_render_chat_raises_where_jinja_raises(messages):
    jinja2 = pytest.importorskip("jinja2")
    with pytest.raises(jinja2.exceptions.TemplateError):
        jinja_render(messages)
    with pytest.raises(ChatFormatError):
        render_chat(messages, for_generation=False)


def test_chat_error_names_the_wrong_message():
    messages = chat("Q1", "A1") + [{"role": "assistant", "content": "A2"}]
    with pytest.raises(ChatFormatError, match="message 2"):
        render_chat(messages, for_generation=False)


@pytest.mark.parametrize("messages, pattern", [
    ([], "empty conversation"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "message 1 has role 'tool'"),
    ([{"role": "user", "content": 3}], "message 0 content must be a str"),
    ([{"role": "user"}], "message 0 must be a mapping"),
    (chat("Q", "A"), "must end with a user message"),
])
def test_chat_format_errors(messages, pattern):
    with pytest.raises(ChatFormatError, match=pattern):
        render_chat(messages)


def test_encode_chat_structure(tok):
    ids = tok.encode_chat(chat("What is 2+2?", "It is 4.", "And 3+3?"))
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert ids.count(tok.eos_id) == 1 and ids[-1] != tok.eos_id
    first_user = tok.encode("[INST] What is 2+2? [/INST]", bos=False)
    answer = tok.encode("It is 4.", bos=False)
    assert ids[1:1 + len(first_user) + len(answer) + 1] == first_user + answer + [tok.eos_id]
    # Every segment carries its own dummy-prefix space; decode drops only the first one.
    assert tok.decode(ids) == "[INST] What is 2+2? [/INST] It is 4. [INST] And 3+3? [/INST]"


def test_encode_chat_places_system_prompt_in_the_first_user_turn_for_v1(tok):
    ids = tok.encode_chat([{"role": "system", "content": "Be brief."}] + chat("Q1", "A1", "Q2"))
    assert ids == tok.encode_chat(chat("Be brief.\n\nQ1", "A1", "Q2"))


def test_encode_chat_merges_turns_as_mistral_common_does(tok):
    merged = [{"role": "user", "content": "a"}, {"role": "user", "content": ""}, {"role": "user", "content": "b"}]
    assert tok.encode_chat(merged) == tok.encode_chat(chat("a\n\nb"))
    # A conversation opening with an answer gets an empty user turn first.
    opening = [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi"}]
    assert tok.encode_chat(opening) == tok.encode_chat(chat("", "Hello.", "Hi"))


@pytest.mark.parametrize("messages, pattern", [
    ([], "empty conversation"),
    ("Hi", "empty conversation"),
    ([{"role": "assistant", "content": "A"}], "message 0 is 'assistant'"),
    (chat("Q", "A"), "must not end with an assistant message"),
    (chat("Q", "A") + [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
     "message 2 is 'system' after 'assistant'"),
    (chat("Q", "") + chat("Q"), "message 1 is an empty assistant message"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "message 1 is a tool result without"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "abcdefghi", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "abcdefghi", "content": "b"}], "need a tokenizer with tool tokens.*is v1"),
    ([{"role": "user", "content": "a"}, {"role": "function", "content": "b"}], "message 1 has role 'function'"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "message 0 content must be a str, got list"),
    ([{"role": "user", "content": None}], "message 0 content must be a str, got NoneType"),
    ([{"role": "assistant", "content": "", "tool_calls": []}, {"role": "user", "content": "Q"}],
     "message 0 is an empty assistant message"),
    ([{"role": "user", "content": "Q", "name": "bob"}], "message 0 has 'name'"),
    ([{"role": "user"}], "message 0 must be a mapping"),
])
def test_encode_chat_refuses_in_one_line(tok, messages, pattern):
    with pytest.raises(ChatFormatError, match=pattern) as raised:
        tok.encode_chat(messages)
    assert "\n" not in str(raised.value)


def test_encode_chat_for_scoring_may_end_with_an_answer(tok):
    ids = tok.encode_chat(chat("Q", "A"), for_generation=False)
    assert ids[-1] == tok.eos_id and ids == tok.encode_chat(chat("Q")) + tok.encode("A", bos=False, eos=True)


def test_training_is_deterministic(model_dir, tmp_path):
    again = train_tokenizer(load_tiny_corpus(), tmp_path / "tokenizer.model", vocab_size=1000)
    assert again.read_bytes() == (model_dir / "tokenizer.model").read_bytes()


def test_missing_file_error_names_file(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(TokenizerError, match="nope"):
        Tokenizer.from_file(missing)
    with pytest.raises(TokenizerError, match=str(tmp_path.name)):
        Tokenizer.from_file(tmp_path)  # a folder without tokenizer.model


@pytest.mark.parametrize("content", [b"garbage, not a protobuf \xff\xfe", b""])
def test_garbage_file_error_names_file(tmp_path, content):
    bad = tmp_path / "broken.model"
    bad.write_bytes(content)
    with pytest.raises(TokenizerError, match="broken.model"):
        Tokenizer.from_file(bad)


def test_matches_transformers_llama_tokenizer(tok, model_dir, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = transformers.LlamaTokenizer.from_pretrained(str(model_dir))
    # HF's Metaspace adds no prefix to text already starting with a space, unlike sentencepiece,
    # so compare plain texts (no leading space).
    texts = [line for line in load_tiny_corpus().splitlines() if line and not line[0].isspace()]
    texts += ["emoji 🦀 and 日本語", "a\nb\tc  d", "trailing  "]
    for text in texts:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text, bos=False), text
