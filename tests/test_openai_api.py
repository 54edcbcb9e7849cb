"""The OpenAI wire format without a server: which request bodies are refused, and what a Job holds."""
from __future__ import annotations

import pytest

from mixtral_export.serving.openai_api import BadRequest, parse


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from mixtral_export.tokenizer import Tokenizer

    return Tokenizer.from_file(tiny_checkpoint)


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}
COMPLETION = {"model": "tiny", "prompt": "Hi"}


@pytest.mark.parametrize("kind, extra, param", [
    ("chat", {"functions": [{"name": "f"}]}, "functions"), ("completion", {"tools": []}, "tools"),
    ("completion", {"echo": True}, "echo"), ("completion", {"best_of": 2}, "best_of"),
    ("completion", {"suffix": "x"}, "suffix"), ("chat", {"top_k": 5}, "top_k"), ("chat", {"store": True}, "store"),
    ("completion", {"messages": [{"role": "user", "content": "x"}]}, "messages"),
    ("chat", {"prompt": "x"}, "prompt"), ("chat", {"no_such_field": 1}, "no_such_field")])
def test_an_unimplemented_field_is_refused_by_name(tokenizer, kind, extra, param):
    body = {**(CHAT if kind == "chat" else COMPLETION), **extra}
    with pytest.raises(BadRequest, match=f"'{param}'") as caught:
        parse(kind, body, tokenizer, "tiny", 16)
    assert caught.value.param == param


@pytest.mark.parametrize("extra", [{"response_format": {"type": "text"}}, {"tools": []}, {"tool_choice": "none"},
                                   {"parallel_tool_calls": False}, {"tool_choice": "auto"},
                                   {"echo": False}, {"response_format": None}, {"user": "someone"},
                                   {"messages": [{"role": "user", "content": "Hi", "tool_calls": [], "name": None}]}])
def test_a_field_at_its_off_value_is_accepted(tokenizer, extra):
    assert parse("chat", {**CHAT, **extra}, tokenizer, "tiny", 16).prompts


@pytest.mark.parametrize("value, message", [
    ({"type": "xml"}, "type 'xml' is not supported"), ("json", "type 'json' is not supported"),
    ({"type": "json_object", "schema": {}}, "no member 'schema'"),
    ({"type": "text", "json_schema": {}}, "no member 'json_schema'"),
    ({"type": "json_schema"}, "must be an object with a 'name'"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strictness": 1}}, "no member 'strictness'"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "name' must be a non-empty string"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "must be a JSON schema object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": "yes"}}, "strict' must be a boolean")])
def test_a_bad_response_format_is_refused_naming_what_is_wrong(tokenizer, value, message):
    with pytest.raises(BadRequest, match=message) as caught:
        parse("chat", {**CHAT, "response_format": value}, tokenizer, "tiny", 16)
    assert caught.value.param == "response_format"


def test_response_format_becomes_the_jobs_grammar(tokenizer):
    from mixtral_export.runtimes.json_grammar import json_grammar

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    for kind, body in (("chat", CHAT), ("completion", COMPLETION)):
        job = parse(kind, {**body, "response_format": {"type": "json_schema", "json_schema": {
            "name": "thing", "description": "d", "schema": schema, "strict": True}}}, tokenizer, "tiny", 16)
        assert job.options["grammar"] == json_grammar(schema) and job.grammar_param == "response_format"
        job = parse(kind, {**body, "response_format": {"type": "json_object"}}, tokenizer, "tiny", 16)
        assert job.options["grammar"] == json_grammar(None)
        assert "grammar" not in parse(kind, {**body, "response_format": {"type": "text"}}, tokenizer, "tiny", 16).options


def test_a_message_field_that_is_not_encoded_is_refused(tokenizer):
    for extra in ({"name": "bob"}, {"tool_calls": [{"id": "a"}]}, {"tool_call_id": "a"}):
        message = {"role": "user", "content": "Hi", **extra}
        with pytest.raises(BadRequest, match=f"message 0 has '{next(iter(extra))}'"):
            parse("chat", {**CHAT, "messages": [message]}, tokenizer, "tiny", 16)


@pytest.mark.parametrize("extra, param, pattern", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "need a tokenizer with tool tokens"),
    ({"tool_choice": "required"}, "tool_choice", "'required' needs 'tools'"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "tool_calls": [
        {"id": "abcdefghi", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "abcdefghi", "content": "1"}]}, "messages", "this tokenizer is v1")])
def test_a_tokenizer_without_tool_tokens_refuses_tools_saying_why(tokenizer, extra, param, pattern):
    with pytest.raises(BadRequest, match=pattern) as caught:
        parse("chat", {**CHAT, **extra}, tokenizer, "tiny", 16)
    assert caught.value.param == param


def test_n_repeats_each_prompt_and_gives_each_choice_its_own_seed(tokenizer):
    from mixtral_export.serving.openai_api import choice_options

    job = parse("completion", {**COMPLETION, "prompt": [[1, 2], [3]], "n": 3, "seed": 9}, tokenizer, "tiny", 16)
    assert job.prompts == [[1, 2]] * 3 + [[3]] * 3 and job.n == 3
    seeds = [choice_options(job, i)["seed"] for i in range(6)]
    assert seeds[0] == 9 and len(set(seeds)) == 6
    assert seeds == [choice_options(job, i)["seed"] for i in range(6)]  # the same every time
    unseeded = parse("completion", {**COMPLETION, "n": 2}, tokenizer, "tiny", 16)
    assert choice_options(unseeded, 1)["seed"] is None


@pytest.mark.parametrize("kind, extra, param", [
    ("chat", {"top_logprobs": 2}, "top_logprobs"), ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"logprobs": 1}, "logprobs"), ("completion", {"logprobs": True}, "logprobs"),
    ("completion", {"n": 0}, "n"), ("completion", {"logit_bias": {"a": 1}}, "logit_bias"),
    ("chat", {"frequency_penalty": 2.5}, "frequency_penalty")])
def test_bad_logprobs_n_bias_and_penalties_name_their_field(tokenizer, kind, extra, param):
    body = {**(CHAT if kind == "chat" else COMPLETION), **extra}
    with pytest.raises(BadRequest) as caught:
        parse(kind, body, tokenizer, "tiny", 16)
    assert caught.value.param == param


def test_logprobs_options_become_the_alternatives_per_token(tokenizer):
    assert parse("chat", {**CHAT, "logprobs": True}, tokenizer, "tiny", 16).options["logprobs"] == 0
    assert parse("chat", {**CHAT, "logprobs": True, "top_logprobs": 20}, tokenizer, "tiny", 16).options["logprobs"] == 20
    assert parse("chat", {**CHAT, "logprobs": False}, tokenizer, "tiny", 16).options["logprobs"] is None
    assert parse("completion", {**COMPLETION, "logprobs": 5}, tokenizer, "tiny", 16).options["logprobs"] == 5
