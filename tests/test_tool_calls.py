"""Tools, tool calls and tool results in the v3 chat format against mistral-common (its shipped v3
tokenizer, Mixtral-8x22B's): identical ids, refused exactly where it refuses, over written
conversations and every role sequence of up to five messages; the v1 tokenizer refuses tools."""
from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

mistral_common = pytest.importorskip("mistral_common", reason="mistral-common is not installed "
                                     "(pip install -e '.[test]')")
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.protocol.instruct.validator import ValidationMode  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402

from mixtral_export.tokenizer import ChatFormatError, Tokenizer  # noqa: E402
from mixtral_export.tool_calls import CALL_ID, ToolFormatError, check_tools, new_call_id  # noqa: E402

DATA = Path(mistral_common.__file__).parent / "data"
V3 = DATA / "mistral_instruct_tokenizer_240323.model.v3"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city, ☀️",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "number"}}}, "strict": True}}
BARE = {"type": "function", "function": {"name": "ping-2"}}  # no description, no parameters
TOOLSETS = [None, [WEATHER], [WEATHER, ADD, BARE]]


def call(call_id, name="get_weather", arguments='{"city": "Paris"}'):
    out = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return out if call_id is None else {"id": call_id, **out}


WRITTEN = [  # (messages, tools): tools in different positions, several calls, results, system prompts, turns
    ([{"role": "user", "content": "Weather in Paris?"}], [WEATHER]),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
      {"role": "assistant", "content": None, "tool_calls": [call("abcdefghi")]},
      {"role": "tool", "tool_call_id": "abcdefghi", "content": '{"temp": 20, "sky": "clear"}'}], [WEATHER, ADD]),
    ([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
      {"role": "assistant", "tool_calls": [call("aaaaaaaaa"), call("bbbbbbbbb", "add", '{"a": 1, "b": 2.5}')]},
      {"role": "tool", "tool_call_id": "aaaaaaaaa", "content": "sunny"},
      {"role": "tool", "tool_call_id": "bbbbbbbbb", "content": "3.5"},
      {"role": "assistant", "content": "Sunny, and 3.5."}, {"role": "user", "content": "Thanks"}], [WEATHER, ADD, BARE]),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [call("Z9z9Z9z9Z")]},
      {"role": "tool", "tool_call_id": "Z9z9Z9z9Z", "content": ""},
      {"role": "assistant", "tool_calls": [call("Y8y8Y8y8Y", "ping-2", "")]},
      {"role": "tool", "tool_call_id": "Y8y8Y8y8Y", "content": "not json {"}], [BARE]),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "late"}, {"role": "user", "content": "b"}],
     [ADD]),
    ([{"role": "user", "content": "日本語 🦀"}, {"role": "assistant", "tool_calls": [
        call("123456789", arguments='{"city": "東京", "unit": "C"}')]},
      {"role": "tool", "tool_call_id": "123456789", "content": '{"天気": "晴れ"}'}], [WEATHER]),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call("abcdefghi", arguments={"city": "Rome"})]},
      {"role": "tool", "tool_call_id": "abcdefghi", "content": "[1, 2]"}], None),  # history without tools
]


@pytest.fixture(scope="module")
def v3() -> Tokenizer:
    return Tokenizer.from_file(V3)


@pytest.fixture(scope="module")
def reference() -> dict[ValidationMode, MistralTokenizer]:
    return {mode: MistralTokenizer.from_file(str(V3), mode=mode) for mode in (ValidationMode.test, ValidationMode.agnostic)}


def reference_ids(mt: MistralTokenizer, messages, tools) -> list[int] | None:
    """mistral-common's ids, or None where it refuses the conversation."""
    try:
        return mt.encode_chat_completion(ChatCompletionRequest.from_openai(messages, tools=tools)).tokens
    except Exception:
        return None


def our_ids(tok: Tokenizer, messages, tools, for_generation: bool) -> list[int] | None:
    try:
        return tok.encode_chat(messages, for_generation, check_tools(tools))
    except ChatFormatError:
        return None


@pytest.mark.parametrize("n", range(len(WRITTEN)))
def test_written_conversations_equal_mistral_common(v3, reference, n):
    messages, tools = WRITTEN[n]
    want = reference_ids(reference[ValidationMode.test], messages, tools)
    assert want is not None
    assert v3.encode_chat(messages, tools=check_tools(tools)) == want


def test_tool_markers_sit_where_mistral_common_puts_them(v3):
    messages, tools = WRITTEN[2]
    ids = v3.encode_chat(messages, tools=check_tools(tools))
    piece = v3.sp.piece_to_id
    assert ids.count(piece("[AVAILABLE_TOOLS]")) == 1 and ids.count(piece("[TOOL_CALLS]")) == 1
    assert ids.count(piece("[TOOL_RESULTS]")) == ids.count(piece("[/TOOL_RESULTS]")) == 2
    last_inst = len(ids) - 1 - ids[::-1].index(piece("[INST]"))
    assert ids[last_inst - 1] == piece("[/AVAILABLE_TOOLS]")  # the tools open the last user turn


def random_message(rng: random.Random, role: str) -> dict:
    ids = ["abcdefghi", "ABC123xyz", "123456789", "call_1", None]  # "call_1" breaks v3's id rule; None: no id
    if role == "user":
        return {"role": "user", "content": rng.choice(["Hi", "", "Weather in Paris?", "日本 🦀"])}
    if role == "system":
        return {"role": "system", "content": rng.choice(["Be brief.", ""])}
    if role == "tool":
        return {"role": "tool", "tool_call_id": rng.choice(ids[:4]),
                "content": rng.choice(['{"t": 20}', "sunny", "", "[1, 2]", "42"])}
    if rng.random() < 0.4:
        return {"role": "assistant", "content": rng.choice(["Sure.", "", " ok  "])}
    calls = [call(rng.choice(ids), rng.choice(["get_weather", "add", "ping-2", "bad name"]),
                  rng.choice(['{"city": "Paris"}', '{"a":1,  "b": 2.50}', "", "not json", '{"x": "é"}']))
             for _ in range(rng.choice([1, 1, 2, 3]))]
    return {"role": "assistant", "content": rng.choice([None, ""]), "tool_calls": calls}


@pytest.mark.parametrize("for_generation", [True, False])
def test_accepts_and_refuses_what_mistral_common_does(v3, reference, for_generation):
    """Every role sequence of up to five messages (tool roles included), three random fillings each,
    with no tools, one or three: identical ids where mistral-common encodes, refused where it refuses."""
    mode = ValidationMode.test if for_generation else ValidationMode.agnostic
    rng = random.Random(2)
    accepted = refused = with_calls = 0
    for length in range(1, 6):
        for roles in itertools.product(["user", "assistant", "system", "tool"], repeat=length):
            for _ in range(3):
                messages, tools = [random_message(rng, r) for r in roles], rng.choice(TOOLSETS)
                want = reference_ids(reference[mode], messages, tools)
                assert our_ids(v3, messages, tools, for_generation) == want, json.dumps(messages)
                accepted, refused = accepted + (want is not None), refused + (want is None)
                with_calls += want is not None and "tool" in roles
    assert accepted > 300 and refused > 300 and with_calls > 50  # both sides of the rules, tools exercised


@pytest.mark.parametrize("tools, pattern", [
    ([{"type": "retrieval"}], r"tools\[0\] has type 'retrieval': only 'function'"),
    ([{"type": "function", "function": {"name": "f"}, "extra": 1}], r"tools\[0\] has 'extra'"),
    ([{"type": "function", "function": {"name": "f", "examples": []}}], r"tools\[0\].function has 'examples'"),
    ([{"type": "function", "function": {"name": "no spaces"}}], r"tools\[0\].function.name is 'no spaces'"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "nothing"}}}],
     r"tools\[0\].function.parameters is not a valid JSON schema"),
    ({"name": "f"}, "'tools' must be a list"),
])
def test_bad_tools_are_refused_naming_the_field(tools, pattern):
    with pytest.raises(ToolFormatError, match=pattern) as raised:
        check_tools(tools)
    assert raised.value.param == "tools" and "\n" not in str(raised.value)


@pytest.mark.parametrize("messages, pattern", [
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call("call_1")]},
      {"role": "tool", "tool_call_id": "call_1", "content": "x"}], "tool call id is 9 characters"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call("abcdefghi")]},
      {"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], "fewer tool results than calls"),
    ([{"role": "user", "content": "q"}, {"role": "tool", "tool_call_id": "abcdefghi", "content": "x"}],
     "message 1 is 'tool' after 'user'"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "tool_calls": [call("abcdefghi")]}],
     "message 1 has both content and tool_calls"),
])
def test_bad_tool_history_is_refused_in_one_line(v3, messages, pattern):
    with pytest.raises(ChatFormatError, match=pattern) as raised:
        v3.encode_chat(messages)
    assert "\n" not in str(raised.value)


def test_v1_tokenizer_refuses_tools_saying_why():
    v1 = Tokenizer.from_file(DATA / "tokenizer.model.v1")
    with pytest.raises(ChatFormatError, match="need a tokenizer with tool tokens.*this tokenizer is v1"):
        v1.encode_chat([{"role": "user", "content": "q"}], tools=check_tools([WEATHER]))
    messages, _ = WRITTEN[1]
    with pytest.raises(ChatFormatError, match="this tokenizer is v1"):
        v1.encode_chat(messages)


def test_new_call_ids_follow_v3s_rule_and_differ(v3, reference):
    ids = {new_call_id() for _ in range(200)}
    assert len(ids) == 200 and all(CALL_ID.match(i) for i in ids)
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call(i) for i in sorted(ids)[:3]]}]
    messages += [{"role": "tool", "tool_call_id": i, "content": "ok"} for i in sorted(ids)[:3]]
    assert v3.encode_chat(messages) == reference_ids(reference[ValidationMode.test], messages, None)
