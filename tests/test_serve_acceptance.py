"""The OpenAI surface end to end, as a client meets it: a tiny random Mixtral of its own shape that
carries Mixtral-8x22B's v3 tokenizer (mistral-common ships it), `mixtral-export export`, then
`mixtral-export serve` on 127.0.0.1, driven by the official openai client. JSON-schema replies
validate (plain and streamed), tool calls under tool_choice required and named have arguments that
validate against their function's schema, a tool result in the history is encoded as mistral-common
encodes it, logprobs equal transformers' for the first token, n = 3 with a seed is reproducible, and
logit_bias forces a token. One server for the module."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
mistral_common = pytest.importorskip("mistral_common", reason="mistral-common ships the v3 tokenizer")
pytest.importorskip("fastapi")
pytest.importorskip("llguidance")

from tests.test_serve import REPO, Server  # noqa: E402

V3 = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "a + b",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "system", "content": "You can call functions."}, {"role": "user", "content": "Weather in Paris?"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Shapes of its own (6 query heads of 8 over 2 kv heads, hidden 48, no sliding window), the v3 vocabulary."""
    from mixtral_export.artifact.config import MixtralConfig
    from mixtral_export.tiny import random_weights, write_checkpoint

    config = MixtralConfig(vocab_size=32768, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=4096,
                           rope_theta=1e6, sliding_window=None, num_local_experts=4, num_experts_per_tok=2,
                           bos_token_id=1, eos_token_id=(2,), tie_word_embeddings=False, dtype="float32")
    return write_checkpoint(tmp_path_factory.mktemp("v3") / "checkpoint", config, random_weights(config, seed=7),
                            tokenizer_model=V3)


@pytest.fixture(scope="module")
def server(checkpoint):
    artifact = checkpoint.parent / "onnx"
    built = subprocess.run([sys.executable, "-m", "mixtral_export", "export", str(checkpoint), "-o", str(artifact),
                            "--batch", "4", "--prefill-chunk", "16,64", "--cache-slots", "512"],
                           cwd=REPO, capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    running = Server(artifact)
    yield running
    code, output = running.stop()
    assert code == 0, output


@pytest.fixture(scope="module")
def mistral():
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.v3()


def mistral_ids(mistral, messages, tools=None) -> list[int]:
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    return mistral.encode_chat_completion(ChatCompletionRequest.from_openai(messages, tools=tools)).tokens


def check_calls(calls, names=None) -> None:
    """Each call: a v3 id, a known function (one of `names`), arguments that validate against its schema."""
    assert calls
    for call in calls:
        assert call.type == "function" and len(call.id) == 9 and call.id.isalnum()
        assert call.function.name in (names or SCHEMAS)
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def streamed_calls(stream) -> tuple[list[dict], str, list]:
    """The calls a stream's tool-call deltas add up to, its finish reason and its logprobs entries."""
    calls: dict[int, dict] = {}
    finish, logprobs = None, []
    for part in stream:
        choice = part.choices[0]
        logprobs += choice.logprobs.content if choice.logprobs else []
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish, logprobs


@pytest.mark.parametrize("seed", [1, 2])
def test_json_schema_replies_validate_plain_and_streamed(server, seed):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    args = dict(model="tiny", messages=[{"role": "user", "content": "A person, as JSON"}], max_tokens=96,
                temperature=1.0, seed=seed, response_format=response_format)
    reply = server.client.chat.completions.create(**args)
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    text = "".join(part.choices[0].delta.content or "" for part in server.client.chat.completions.create(
        stream=True, **args) if part.choices)
    assert text == reply.choices[0].message.content  # the same seed, the same reply
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_tool_choice_required_calls_a_tool_whose_arguments_validate(server, seed):
    args = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=1.0,
                seed=seed, logprobs=True)
    reply = server.client.chat.completions.create(**args)
    assert reply.choices[0].finish_reason == "tool_calls"
    check_calls(reply.choices[0].message.tool_calls)
    calls, finish, logprobs = streamed_calls(server.client.chat.completions.create(stream=True, **args))
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in reply.choices[0].message.tool_calls]
    every = reply.choices[0].logprobs.content  # one entry per token, [TOOL_CALLS] first, in both
    assert len(every) == reply.usage.completion_tokens and every[0].token == "[TOOL_CALLS]"
    assert [(e.token, e.logprob) for e in logprobs] == [(e.token, e.logprob) for e in every]


@pytest.mark.parametrize("parallel", [True, False])
def test_a_named_tool_choice_calls_that_function(server, parallel):
    reply = server.client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
        parallel_tool_calls=parallel, max_tokens=120, temperature=1.0, seed=5)
    calls = reply.choices[0].message.tool_calls
    check_calls(calls, names=["add"])
    assert reply.choices[0].finish_reason == "tool_calls" and (parallel or len(calls) == 1)


def test_a_tool_result_in_the_history_is_encoded_as_mistral_common_does(server, mistral):
    call = server.client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=120, seed=9,
                                                 tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                                 parallel_tool_calls=False).choices[0].message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "clear", "temperature": 21})}]
    reply = server.client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=6,
                                                  temperature=0)
    assert reply.usage.prompt_tokens == len(mistral_ids(mistral, history, TOOLS))
    assert reply.choices[0].finish_reason in ("length", "stop", "tool_calls")
    with pytest.raises(openai.BadRequestError, match="tool call id"):  # v3's id rule: 9 of a-z, A-Z, 0-9
        server.client.chat.completions.create(model="tiny", messages=[
            *history[:2], {**history[2], "tool_calls": [{**history[2]["tool_calls"][0], "id": "call_1"}]},
            {**history[3], "tool_call_id": "call_1"}], tools=TOOLS, max_tokens=2)


def test_logprobs_are_consistent_and_the_first_equals_transformers(server, checkpoint, mistral):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    messages = [{"role": "user", "content": "Name three colours."}]
    reply = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                  logprobs=True, top_logprobs=5)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6
    for item in content:  # greedy: the chosen token is the most likely one, and the list is sorted
        values = [top.logprob for top in item.top_logprobs]
        assert len(values) == 5 and values == sorted(values, reverse=True) and item.logprob == values[0] <= 0
        assert item.token == item.top_logprobs[0].token and np.exp(values).sum() <= 1 + 1e-9
    model = transformers.MixtralForCausalLM.from_pretrained(checkpoint, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(torch.tensor([mistral_ids(mistral, messages)])).logits[0, -1].double()  # (V,)
    expected = torch.log_softmax(logits, -1).topk(5).values.numpy()
    assert np.abs(np.array([top.logprob for top in content[0].top_logprobs]) - expected).max() < 1e-4


def test_n3_with_a_seed_is_reproducible(server):
    args = dict(model="tiny", messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=8,
                temperature=1.0, seed=11, n=3)
    first, again = (server.client.chat.completions.create(**args) for _ in range(2))
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1


def test_logit_bias_forces_a_token(server, mistral):
    tokenizer = mistral.instruct_tokenizer.tokenizer
    token = tokenizer.encode("hello", bos=False, eos=False)[0]  # "▁hell"
    args = dict(model="tiny", messages=[{"role": "user", "content": "Say something"}], max_tokens=5, temperature=1.0,
                seed=3, logprobs=True)
    free = server.client.chat.completions.create(**args).choices[0]
    forced = server.client.chat.completions.create(logit_bias={str(token): 100}, **args).choices[0]
    assert [item.token for item in forced.logprobs.content] == [" hell"] * 5
    assert forced.message.content == tokenizer.decode([token] * 5) == "hell hell hell hell hell" != free.message.content
