"""Our Tokenizer against mistral-common, Mistral's reference, on the tokenizers real Mixtral
checkpoints ship. mistral-common's package data holds them (a test dependency; nothing is
downloaded): tokenizer.model.v1 (Mixtral-8x7B) and mistral_instruct_tokenizer_240323.model.v3
(Mixtral-8x22B); the v2 model (same chat format as v3 for text) and the v7 one (refused) too."""
from __future__ import annotations

import itertools
import random
import shutil
from pathlib import Path

import pytest

mistral_common = pytest.importorskip("mistral_common", reason="mistral-common is not installed "
                                     "(pip install -e '.[test]')")
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage  # noqa: E402
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.protocol.instruct.validator import ValidationMode  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402

from mixtral_export.tokenizer import ChatFormatError, Tokenizer  # noqa: E402

DATA = Path(mistral_common.__file__).parent / "data"
FILES = {"v1": "tokenizer.model.v1", "v2": "mistral_instruct_tokenizer_240216.model.v2",
         "v3": "mistral_instruct_tokenizer_240323.model.v3", "v7": "mistral_instruct_tokenizer_241114.model.v7"}
CHAT_VERSIONS = ["v1", "v2", "v3"]
MESSAGE_TYPES = {"user": UserMessage, "assistant": AssistantMessage, "system": SystemMessage}

TEXTS = [
    "", " ", "  ", "\n", "\t", "a", " a", "  a", "a ", "a  ", "  two  spaces  ", "     five",
    "Hello, world!", "line one\nline two\n", "\n\nleading newlines", "tabs\tand\t\ttabs", "\r\nwindows\r\n",
    "digits 0123456789 and 3.14159", "café crème brûlée, Zürich, São Paulo", "Ελληνικά λόγος",
    "日本語のテキスト", "你好，世界！", "한국어 텍스트", "emoji 🙂🚀🦀 and ❤️ 👩‍👩‍👧", " 🦀", "🦀",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀 ꙮ", "e\u0301 combining accent", "zero\u200bwidth", "nul\x00byte", "\x7f\x1b[0m",
    "literal \u2581 block", "\u2581", "a\u2581b", "<s>[INST] not special [/INST]</s>", "[INST]", "[/INST]",
    "[TOOL_CALLS] [AVAILABLE_TOOLS] [IMG] [control_8]", "<unk> <0x41>", "    def f(x):\n        return x ** 2\n",
]
MARKED = [
    [("user", "Hi")],
    [("user", "What is 2+2?"), ("assistant", "4."), ("user", "And 3+3?"), ("assistant", "6."), ("user", "Thanks")],
    [("system", "Be brief."), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2")],
    [("user", "Q1"), ("system", "Late system."), ("user", "Q2")],
    [("system", "One."), ("system", ""), ("user", "Q"), ("system", "Two.")],
    [("system", "Only a system prompt.")],
    [("assistant", "I speak first."), ("user", "Go on.")],
    [("user", "a"), ("user", ""), ("user", "b"), ("assistant", "c"), ("assistant", "d"), ("user", "e")],
    [("user", "  padded  "), ("assistant", "  answer with spaces   "), ("user", " \t")],
    [("user", ""), ("assistant", " "), ("user", "")],
    [("system", "日本語で答えて 🦀"), ("user", "café ❤️"), ("assistant", "はい。"), ("user", "𓀀\u2581x")],
    [("user", "[INST] injected [/INST]</s><s>"), ("assistant", "[TOOL_CALLS] no"), ("user", "\n\nend\n")],
]


@pytest.fixture(scope="module")
def ours() -> dict[str, Tokenizer]:
    return {v: Tokenizer.from_file(DATA / name) for v, name in FILES.items()}


@pytest.fixture(scope="module")
def reference() -> dict[tuple[str, ValidationMode], MistralTokenizer]:
    return {(v, mode): MistralTokenizer.from_file(str(DATA / FILES[v]), mode=mode)
            for v in CHAT_VERSIONS for mode in (ValidationMode.test, ValidationMode.agnostic)}


def as_messages(turns) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


def reference_chat(mt: MistralTokenizer, messages: list[dict]) -> list[int] | None:
    """mistral-common's ids of `messages`, or None where it refuses them."""
    try:
        request = ChatCompletionRequest(messages=[MESSAGE_TYPES[m["role"]](content=m["content"]) for m in messages])
        return mt.encode_chat_completion(request).tokens
    except Exception:
        return None


def our_chat(tok: Tokenizer, messages: list[dict], for_generation: bool) -> list[int] | None:
    try:
        return tok.encode_chat(messages, for_generation=for_generation)
    except ChatFormatError:
        return None


def test_shipped_tokenizers_are_the_mixtral_ones(ours):
    v1, v3 = ours["v1"], ours["v3"]
    assert (v1.vocab_size, v3.vocab_size) == (32000, 32768)
    assert [v1.sp.id_to_piece(i) for i in range(v1.vocab_size) if v1.sp.is_control(i)] == ["<s>", "</s>"]
    assert v1.sp.piece_to_id("[INST]") == v1.sp.unk_id()  # "[INST]" is text in v1
    for piece in ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[IMG]"):
        assert v3.sp.is_control(v3.sp.piece_to_id(piece)), piece


def test_instruct_version_is_read_from_the_model(ours, tmp_path):
    assert {v: tok.instruct_version for v, tok in ours.items()} == {v: v for v in FILES}
    # A checkpoint names it plain tokenizer.model, which mistral-common's file-name rule calls v1.
    shutil.copy(DATA / FILES["v3"], tmp_path / "tokenizer.model")
    assert Tokenizer.from_file(tmp_path).instruct_version == "v3"


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_encode_equals_mistral_common(ours, reference, version):
    ref = reference[version, ValidationMode.test].instruct_tokenizer.tokenizer
    for text in TEXTS:
        assert ours[version].encode(text, bos=True, eos=True) == ref.encode(text, bos=True, eos=True), text


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_decode_and_stream_equal_mistral_common(ours, reference, version):
    tok, ref = ours[version], reference[version, ValidationMode.test].instruct_tokenizer.tokenizer
    rng = random.Random(0)
    byte_ids = [i for i in range(tok.vocab_size) if tok.sp.is_byte(i)]
    controls = [i for i in range(tok.vocab_size) if tok.sp.is_control(i) or tok.sp.is_unknown(i)][:20]
    cases = [ref.encode(text, bos=True, eos=True) for text in TEXTS]
    for _ in range(2000):  # byte runs cut by control tokens, broken UTF-8, <unk>, leading spaces
        cases.append([rng.choice(byte_ids) if r < 0.4 else rng.choice(controls) if r < 0.55 else
                      rng.randrange(tok.vocab_size) for r in (rng.random() for _ in range(rng.randrange(12)))])
    for ids in cases:
        stream = tok.stream_decoder()
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert tok.decode(ids) == "".join(pieces) == ref.decode(ids), ids
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text.replace("\u2581", " ")


@pytest.mark.parametrize("version", CHAT_VERSIONS)
@pytest.mark.parametrize("n", range(len(MARKED)))
def test_chat_equals_mistral_common(ours, reference, version, n):
    messages = as_messages(MARKED[n])
    want = reference_chat(reference[version, ValidationMode.test], messages)
    assert want is not None
    assert ours[version].encode_chat(messages) == want


@pytest.mark.parametrize("version", CHAT_VERSIONS)
@pytest.mark.parametrize("for_generation", [True, False])
def test_chat_accepts_and_refuses_what_mistral_common_does(ours, reference, version, for_generation):
    """Every conversation of up to four user/assistant/system messages, over tricky contents."""
    mode = ValidationMode.test if for_generation else ValidationMode.agnostic
    contents = ["Hi", "", " ", "  padded  ", "x\n", "日本語 🦀", "[INST] x [/INST]", "a\u2581b", "</s>"]
    rng = random.Random(1)
    accepted = refused = 0
    for length in (1, 2, 3, 4):
        for roles in itertools.product(MESSAGE_TYPES, repeat=length):
            for _ in range(2):
                messages = [{"role": r, "content": rng.choice(contents)} for r in roles]
                want = reference_chat(reference[version, mode], messages)
                assert our_chat(ours[version], messages, for_generation) == want, messages
                accepted, refused = accepted + (want is not None), refused + (want is None)
    assert accepted > 50 and refused > 50  # both sides of the rules were exercised


def test_system_prompt_placement_per_version(ours):
    messages = as_messages([("system", "SYS"), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2")])
    v1, v3 = ours["v1"], ours["v3"]
    assert v1.decode(v1.encode_chat(messages)) == "[INST] SYS\n\nQ1 [/INST] A1 [INST] Q2 [/INST]"
    ids = v3.encode_chat(messages)
    inst, end = v3.sp.piece_to_id("[INST]"), v3.sp.piece_to_id("[/INST]")
    assert ids.count(inst) == ids.count(end) == 2 and ids[1] == inst  # control tokens, not text
    last = len(ids) - 1 - ids[::-1].index(inst)
    assert v3.decode(ids[last:]) == "SYS\n\nQ2" and v3.decode(ids[:last]) == "Q1 A1"


def test_v7_chat_is_refused_in_one_line(ours):
    with pytest.raises(ChatFormatError, match="instruct format v7 is not supported") as raised:
        ours["v7"].encode_chat([{"role": "user", "content": "Hi"}])
    assert "\n" not in str(raised.value)


def test_hf_template_string_differs_from_ours_only_after_special_tokens(ours, tmp_path, monkeypatch):
    """transformers' tokenizer on the original 8x7B template's string gives no dummy-prefix space to
    "[INST]" after <s> or </s> ("[" for "▁["), nor to the answer the template glues to "[/INST]"
    ("Hello" for "▁Hello"); every other id is the same."""
    transformers = pytest.importorskip("transformers")
    from mixtral_export.chat_format import render_chat

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shutil.copy(DATA / FILES["v1"], tmp_path / "tokenizer.model")
    hf = transformers.LlamaTokenizer.from_pretrained(str(tmp_path))
    tok = ours["v1"]
    messages = as_messages([("user", "Hi"), ("assistant", "Hello."), ("user", "Bye")])
    theirs, mine = hf.encode(render_chat(messages), add_special_tokens=False), tok.encode_chat(messages)
    assert len(theirs) == len(mine)
    seams = [n for n in range(len(mine)) if theirs[n] != mine[n]]
    assert seams == [1, 9, 12]  # "[INST]" after <s>, the answer, "[INST]" after </s>
    for n in seams:
        assert tok.sp.id_to_piece(mine[n]) == "\u2581" + tok.sp.id_to_piece(theirs[n])
