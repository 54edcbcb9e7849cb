"""Structured output on every surface: `response_format` through the real server with the official
openai client (plain and streamed, both endpoints), `Session(json_schema=)`, and `generate
--json-schema FILE` / `--json-object`. A tiny random ONNX model with Mixtral 8x22B's v3 tokenizer:
without the grammar its output is noise, never JSON."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")
pytest.importorskip("fastapi")

from tests.test_cli import assert_one_line_error, cli  # noqa: E402
from tests.test_constraint import PERSON, V3, parses  # noqa: E402
from tests.test_serve import Server  # noqa: E402

ITEMS = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                                          "total": {"type": "number"}, "done": {"type": "boolean"}},
         "required": ["items", "total", "done"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "List three fruits as JSON."}]


@pytest.fixture(scope="module")
def v3_onnx(tmp_path_factory) -> Path:
    from mixtral_export.graphs.onnx_export import export_onnx
    from mixtral_export.tiny import TINY_CONFIG, write_head_checkpoint

    folder = tmp_path_factory.mktemp("v3-onnx")
    checkpoint = write_head_checkpoint(folder / "checkpoint", dataclasses.replace(TINY_CONFIG, vocab_size=32768),
                                       tokenizer_model=V3)
    return export_onnx(checkpoint, folder / "artifact", dtype="float32", batch=2, prefill_chunk=16, cache_slots=32)


@pytest.fixture(scope="module")
def server(v3_onnx):
    server = Server(v3_onnx, grace=2)  # `serve` as a wrapper that names the heavy modules it imported
    yield server
    code, output = server.stop()
    assert code == 0 and "IMPORTED []" in output, output  # grammars on the ORT path never import torch


def json_schema_format(schema: dict, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": strict}}


def test_chat_json_schema_replies_validate_plain_and_streamed(server):
    reply = server.client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=60, n=2, seed=3,
                                                  temperature=1.0, response_format=json_schema_format(ITEMS))
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.message.content), ITEMS)
        assert choice.finish_reason == "stop"
    chunks = list(server.client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=60, stream=True, response_format=json_schema_format(PERSON, False)))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)
    assert chunks[-1].choices[0].finish_reason == "stop"
    free = server.client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=60)
    assert not parses(free.choices[0].message.content)  # control: the same request unconstrained


def test_completions_json_object_plain_and_streamed(server):
    reply = server.client.completions.create(model="tiny", prompt="JSON:", max_tokens=40,
                                             extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(reply.choices[0].text), dict) and reply.choices[0].finish_reason == "stop"
    stream = server.client.completions.create(model="tiny", prompt="JSON:", max_tokens=40, stream=True,
                                              temperature=1.0, seed=1,
                                              extra_body={"response_format": json_schema_format(ITEMS)})
    chunks = list(stream)
    jsonschema.validate(json.loads("".join(c.choices[0].text for c in chunks)), ITEMS)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert not parses(server.client.completions.create(model="tiny", prompt="JSON:", max_tokens=40).choices[0].text)


@pytest.mark.parametrize("response_format, message", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}, "Invalid type"),
    (json_schema_format(PERSON), "cannot end within 6 tokens"),
    ({"type": "json_object", "strict": True}, "no member 'strict'"), ({"type": "yaml"}, "'yaml' is not supported")])
def test_a_refused_response_format_is_a_400_naming_it(server, response_format, message):
    with pytest.raises(openai.BadRequestError, match=message) as caught:
        server.client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6,
                                              response_format=response_format)
    assert caught.value.body["param"] == "response_format" and "\n" not in caught.value.body["message"]


def test_session_json_schema(v3_onnx):
    from mixtral_export.runtimes.session import Session
    from mixtral_export.runtimes.step import RequestError

    with Session.open(v3_onnx) as session:
        texts = session.generate(["A person:", "Another:"], json_schema=PERSON, max_new_tokens=64, temperature=0.8,
                                 seed=2)
        for text in texts:
            jsonschema.validate(json.loads(text), PERSON)
        streamed = "".join(session.stream("Hi", chat=True, json_schema={"type": "object"}, max_new_tokens=30))
        assert isinstance(json.loads(streamed), dict)
        with pytest.raises(RequestError, match="not both"):
            session.generate("x", json_schema={}, grammar='start: "a"')


def test_generate_json_schema_file_and_json_object(v3_onnx, tmp_path):
    schema = tmp_path / "items.json"
    schema.write_text(json.dumps(ITEMS))
    run = cli("generate", v3_onnx, "--prompt", "Fruits:", "--json-schema", schema, "--max-new-tokens", "60")
    jsonschema.validate(json.loads(run.stdout), ITEMS)
    run = cli("generate", v3_onnx, "--prompt", "Hi", "--chat", "--json-object", "--max-new-tokens", "30", "--json")
    assert isinstance(json.loads(json.loads(run.stdout)["completions"][0]["text"]), dict)
    bad = tmp_path / "bad.json"
    for text, words in (("{not json", ("bad.json", "not JSON")), ("[1]", ("bad.json", "JSON object")),
                        ('{"type": "strin"}', ("bad.json", "Invalid type"))):
        bad.write_text(text)
        assert_one_line_error(cli("generate", v3_onnx, "--prompt", "x", "--json-schema", bad, ok=False), *words)
    assert_one_line_error(cli("generate", v3_onnx, "--prompt", "x", "--json-schema", schema, "--max-new-tokens", "5",
                              ok=False), "items.json", "cannot end within 5 tokens")
    assert_one_line_error(cli("generate", v3_onnx, "--prompt", "x", "--json-schema", tmp_path / "missing.json",
                              ok=False), "missing.json")
