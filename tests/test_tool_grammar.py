"""The grammar of tool_choice "required" and a named function, on Mixtral-8x22B's v3 tokenizer
(mistral-common ships it): it accepts, token for token, the tool calls mistral-common writes, refuses
other functions, arguments that break their schema and extra calls, and random logits decoded under
its mask always give calls whose arguments validate (without the mask they never do)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
mistral_common = pytest.importorskip("mistral_common", reason="mistral-common ships the v3 tokenizer")

from mixtral_export.runtimes.constraint import Grammars, constrained_token  # noqa: E402
from mixtral_export.runtimes.sampling import Sampler, SamplingParams  # noqa: E402
from mixtral_export.tokenizer import Tokenizer  # noqa: E402
from mixtral_export.tool_call_parser import parse_tool_calls  # noqa: E402
from mixtral_export.tool_calls import check_tools  # noqa: E402
from mixtral_export.serving.tool_grammar import tool_call_grammar  # noqa: E402

V3 = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
TOOLS = check_tools([
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 24}, "unit": {"enum": ["C", "F"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "ping"}}])  # no parameters: the empty object
SCHEMAS = {f.name: f.parameters or {"type": "object", "maxProperties": 0} for f in TOOLS}


@pytest.fixture(scope="module")
def v3() -> Tokenizer:
    return Tokenizer.from_file(V3)


@pytest.fixture(scope="module")
def grammars(v3) -> Grammars:
    return Grammars(v3, v3.vocab_size)


def mistral_call_ids(calls: list[dict]) -> list[int]:
    """The ids mistral-common writes for an assistant message of `calls`: [TOOL_CALLS] ... (without </s>)."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"id": call.get("id", "abcdefghi"), "type": "function",
         "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}} for call in calls]},
        *({"role": "tool", "tool_call_id": call.get("id", "abcdefghi"), "content": "1"} for call in calls)]
    ids = MistralTokenizer.v3().encode_chat_completion(ChatCompletionRequest.from_openai(messages)).tokens
    start = ids.index(5)  # [TOOL_CALLS]
    return ids[start:ids.index(2, start)]


def accepts(grammars: Grammars, grammar: str, ids: list[int]) -> bool:
    """The grammar takes every id and is then complete."""
    matcher = grammars.constraint(grammar, 4096).matcher
    return matcher.validate_tokens(ids) == len(ids) and matcher.consume_tokens(ids) and matcher.is_stopped()


WEATHER = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}, "id": "Abc123xyz"}
ADD = {"name": "add", "arguments": {"a": 1.5, "b": -2}, "id": "ZZZZZZZZZ"}
PING = {"name": "ping", "arguments": {}, "id": "123456789"}


def test_it_accepts_the_calls_mistral_common_writes(v3, grammars):
    marker = v3.control_id("[TOOL_CALLS]")
    every = tool_call_grammar(TOOLS, marker, parallel=True)
    for calls in ([WEATHER], [ADD, PING], [PING, WEATHER, ADD], [{**WEATHER, "arguments": {
            "city": "東京", "unit": "F", "days": 3}}]):
        assert accepts(grammars, every, mistral_call_ids(calls)), calls
    assert accepts(grammars, tool_call_grammar(TOOLS[1:2], marker, parallel=False), mistral_call_ids([ADD]))


@pytest.mark.parametrize("calls, functions, parallel", [
    ([WEATHER], [1], True),  # named "add": no other function
    ([{**WEATHER, "arguments": {"city": "Paris"}}], [0], True),  # a required argument missing
    ([{**WEATHER, "arguments": {"city": "Paris", "unit": "K"}}], [0], True),  # not in the enum
    ([{**WEATHER, "arguments": {"city": "Paris", "unit": "C", "wind": 1}}], [0], True),  # no such argument
    ([{**ADD, "arguments": {"a": "1", "b": 2}}], [1], True),  # a string for a number
    ([{**PING, "arguments": {"x": 1}}], [2], True),  # no parameters: only {}
    ([ADD, ADD], [1], False)])  # parallel calls off: one call
def test_it_refuses_other_functions_bad_arguments_and_extra_calls(v3, grammars, calls, functions, parallel):
    grammar = tool_call_grammar([TOOLS[n] for n in functions], v3.control_id("[TOOL_CALLS]"), parallel)
    assert not accepts(grammars, grammar, mistral_call_ids(calls))


def test_plain_text_is_refused(v3, grammars):
    grammar = tool_call_grammar(TOOLS, v3.control_id("[TOOL_CALLS]"))
    assert grammars.constraint(grammar, 4096).matcher.validate_tokens(v3.encode("Sure!", bos=False)) == 0


def decode_random(v3, grammars, grammar: str | None, seed: int, budget: int = 96) -> list[int]:
    """Random logits (a random model's), sampled at temperature 1 under the grammar (None: unconstrained)."""
    rng = np.random.default_rng(seed)
    sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
    constraint = None if grammar is None else grammars.constraint(grammar, budget)
    ids: list[int] = []
    while len(ids) < budget and not (constraint is not None and constraint.complete):
        logits = rng.normal(0, 3, size=(1, v3.vocab_size)).astype(np.float32)  # (1, V)
        if constraint is None:
            ids.append(int(sampler.next_tokens(logits, [ids])[0]))
        else:
            ids.append(constrained_token(sampler, logits, ids, constraint))
    return ids


@pytest.mark.parametrize("functions, parallel", [([0, 1, 2], True), ([0], False), ([1], True)])
def test_random_logits_under_the_mask_always_give_valid_calls(v3, grammars, functions, parallel):
    marker = v3.control_id("[TOOL_CALLS]")
    chosen = [TOOLS[n] for n in functions]
    grammar = tool_call_grammar(chosen, marker, parallel)
    names = {f.name for f in chosen}
    for seed in range(4):
        ids = decode_random(v3, grammars, grammar, seed)
        assert ids[0] == marker and len(ids) <= 96
        calls = parse_tool_calls(v3.decode(ids[1:]), names, parallel)
        assert calls, v3.decode(ids)
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    # The control: the same random logits without the mask write no tool call at all.
    free = [decode_random(v3, grammars, None, seed) for seed in range(4)]
    assert not any(ids[0] == marker and parse_tool_calls(v3.decode(ids[1:]), names) for ids in free)
