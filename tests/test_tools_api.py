"""Tool fields of the chat API without a server: what is refused (naming the field), how the model's
[TOOL_CALLS] answer is read into OpenAI's tool_calls, and when it falls back to plain content; on
mistral-common's v3 tokenizer (Mixtral-8x22B's)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixtral_export.runtimes.requests import Completion, TokenEvent
from mixtral_export.serving.openai_api import BadRequest, parse, response
from mixtral_export.serving.tools_api import ToolCallHold, call_deltas, tool_answer
from mixtral_export.tool_call_parser import parse_tool_calls
from mixtral_export.tool_calls import CALL_ID

mistral_common = pytest.importorskip("mistral_common", reason="mistral-common ships the v3 tokenizer")

V3 = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PING = {"type": "function", "function": {"name": "ping"}}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER, PING]}


@pytest.fixture(scope="module")
def v3():
    from mixtral_export.tokenizer import Tokenizer

    return Tokenizer.from_file(V3)


def answer_ids(v3, text: str, before: str = "") -> list[int]:
    """What a model writes: optional text, [TOOL_CALLS], the calls' JSON, </s>."""
    head = v3.encode(before, bos=False) if before else []
    return head + [v3.control_id("[TOOL_CALLS]")] + v3.encode(text, bos=False) + [v3.eos_id]


def completion(v3, ids: list[int], reason: str = "eos") -> Completion:
    return Completion([1], ids, v3.decode(ids), reason)


@pytest.mark.parametrize("extra, param, pattern", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope', which is not in"),
    ({"tool_choice": "sometimes"}, "tool_choice", "'sometimes'"),
    ({"tool_choice": {"type": "function", "function": {"name": "ping"}, "extra": 1}}, "tool_choice", "must be"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools", "type 'code_interpreter'"),
    ({"tools": [{**WEATHER, "cache": True}]}, "tools", r"tools\[0\] has 'cache'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "returns": {}}}]}, "tools", "has 'returns'"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "must be a boolean"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs 'tools'")])
def test_bad_tool_fields_are_refused_naming_them(v3, extra, param, pattern):
    with pytest.raises(BadRequest, match=pattern) as caught:
        parse("chat", {**CHAT, **extra}, v3, "tiny", 16)
    assert caught.value.param == param and "\n" not in str(caught.value)


def test_tools_reach_the_prompt_and_only_required_or_named_get_a_grammar(v3):
    job = parse("chat", CHAT, v3, "tiny", 16)
    assert v3.control_id("[AVAILABLE_TOOLS]") in job.prompts[0] and "grammar" not in job.options
    assert job.tools.choice == "auto" and job.tools.parallel
    assert "grammar" not in parse("chat", {**CHAT, "tool_choice": "none"}, v3, "tiny", 16).options
    required = parse("chat", {**CHAT, "tool_choice": "required"}, v3, "tiny", 16).options["grammar"]
    named = parse("chat", {**CHAT, "tool_choice": {"type": "function", "function": {"name": "ping"}},
                           "parallel_tool_calls": False}, v3, "tiny", 16).options["grammar"]
    assert '\\"get_weather\\"' in required and '\\"ping\\"' in required
    assert '\\"get_weather\\"' not in named and '\\"ping\\"' in named and "{0," not in named


def test_parser_reads_lists_of_known_calls_only():
    names = {"get_weather", "ping"}
    calls = parse_tool_calls('[{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcdefghi"}, '
                             '{"name": "ping", "arguments": {}}]', names)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("ping", {})]
    assert all(CALL_ID.match(c.id) for c in calls) and calls[0].id != "abcdefghi"  # fresh ids
    assert parse_tool_calls(' {"name": "ping", "arguments": "{}"} ', names)[0].arguments == "{}"
    for bad in ('[{"name": "rm", "arguments": {}}]', '[{"name": "ping", "arguments": {}}', "[]", "ping()",
                '[{"name": "ping", "arguments": [1]}]', '[{"name": "ping", "arguments": {}, "extra": 1}]'):
        assert parse_tool_calls(bad, names) is None, bad
    two = '[{"name": "ping", "arguments": {}}, {"name": "ping", "arguments": {}}]'
    assert len(parse_tool_calls(two, names)) == 2 and parse_tool_calls(two, names, parallel=False) is None


def test_a_tool_call_answer_becomes_openai_tool_calls(v3):
    job = parse("chat", CHAT, v3, "tiny", 16)
    ids = answer_ids(v3, '[{"name": "get_weather", "arguments": {"city": "東京"}}]')
    choice = response(job, [completion(v3, ids)], v3)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and CALL_ID.match(call["id"]) and choice["message"]["content"] is None
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "東京"}'}
    # Text before the marker is the message's content.
    ids = answer_ids(v3, '[{"name": "ping", "arguments": {}}]', before="Let me check.")
    message = response(job, [completion(v3, ids)], v3)["choices"][0]["message"]
    assert message["content"] == "Let me check." and message["tool_calls"][0]["function"]["name"] == "ping"


@pytest.mark.parametrize("text, extra", [
    ('[{"name": "get_weather", "arguments": {"city": "Par', {}),  # cut off
    ('[{"name": "delete_all", "arguments": {}}]', {}),  # no such tool
    ('[{"name": "ping", "arguments": {}}]', {"tool_choice": "none"}),  # calls not allowed
    ('[{"name": "ping", "arguments": {}}, {"name": "ping", "arguments": {}}]', {"parallel_tool_calls": False})])
def test_anything_else_falls_back_to_plain_content(v3, text, extra):
    job = parse("chat", {**CHAT, **extra}, v3, "tiny", 16)
    ids = answer_ids(v3, text)
    choice = response(job, [completion(v3, ids, "length")], v3)["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": v3.decode(ids)}
    assert choice["finish_reason"] == "length"


def test_a_stream_holds_everything_from_the_marker_on(v3):
    marker = v3.control_id("[TOOL_CALLS]")
    hold = ToolCallHold(marker)
    events = [TokenEvent(0, t, "x") for t in (10, 11, marker, 12)]
    assert [e.token_id for e in hold.pass_on(events[:1])] == [10]
    assert [e.token_id for e in hold.pass_on(events[1:])] == [11]
    assert hold.pass_on([TokenEvent(0, 13, "y")]) == [] and [e.token_id for e in hold.held] == [marker, 12, 13]
    job = parse("chat", CHAT, v3, "tiny", 16)
    answer = tool_answer(answer_ids(v3, '[{"name": "ping", "arguments": {}}, {"name": "ping", "arguments": {}}]'),
                         v3, job.tools)
    deltas = call_deltas(answer)
    assert [d["tool_calls"][0]["index"] for d in deltas] == [0, 1]
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "ping", "arguments": "{}"}


def test_a_v2_tokenizer_refuses_tools_naming_the_field():
    from mixtral_export.tokenizer import Tokenizer

    v2 = Tokenizer.from_file(V3.parent / "mistral_instruct_tokenizer_240216.model.v2")
    with pytest.raises(BadRequest, match="v3 format.*this model's is v2") as caught:
        parse("chat", CHAT, v2, "tiny", 16)
    assert caught.value.param == "tools"
