"""Constrained decoding in the engine: a grammar's mask per row, the budget that ends every output
within max_tokens, and rows without a grammar untouched. A tiny random model with Mixtral 8x22B's v3
tokenizer (mistral-common ships it): its outputs are noise, so only the mask makes them JSON."""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
mistral_common = pytest.importorskip("mistral_common")

from mixtral_export.runtimes.constraint import GrammarError  # noqa: E402
from mixtral_export.runtimes.engine import Engine  # noqa: E402
from mixtral_export.runtimes.json_grammar import json_grammar  # noqa: E402
from mixtral_export.runtimes.logprobs import log_softmax  # noqa: E402
from mixtral_export.runtimes.requests import GenerationConfig, OptionError, generation_config  # noqa: E402
from mixtral_export.runtimes.step import RequestError  # noqa: E402
from mixtral_export.tokenizer import Tokenizer  # noqa: E402

V3 = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
EOS = (2,)
PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green"]}},
    "address": {"type": "object", "properties": {"city": {"type": "string", "minLength": 2}, "zip": {"type": "number"}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "address"], "additionalProperties": False}
SCHEMAS = {
    "json_object": None,
    "person": PERSON,
    "list": {"type": "array", "items": {"type": "object", "properties": {"ok": {"type": "boolean"},
                                                                         "score": {"type": "number"}},
                                        "required": ["ok"]}, "minItems": 1},
    "choice": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog", 3, None]},
                                                "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
               "required": ["kind", "note"]},
    "numbers": {"type": "object", "properties": {"x": {"type": "number"}, "n": {"type": "integer"},
                                                 "xs": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}},
                "required": ["x", "n", "xs"]},
}


@pytest.fixture(scope="module")
def v3_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Mixtral whose vocabulary is the v3 tokenizer's (32768 tokens)."""
    from mixtral_export.tiny import TINY_CONFIG, write_head_checkpoint

    config = dataclasses.replace(TINY_CONFIG, vocab_size=32768)
    return write_head_checkpoint(tmp_path_factory.mktemp("v3") / "checkpoint", config, tokenizer_model=V3)


@pytest.fixture(scope="module")
def tokenizer(v3_checkpoint) -> Tokenizer:
    return Tokenizer.from_file(v3_checkpoint)


@pytest.fixture(scope="module")
def backend(v3_checkpoint):
    from mixtral_export.runtimes.eager import EagerBackend

    return EagerBackend.from_checkpoint(v3_checkpoint, dict(batch=3, prefill_chunk=16))


def run(backend, tokenizer, requests) -> list:
    """Each (prompt ids, GenerationConfig) through one engine, together; their completions."""
    backend.reset()
    engine = Engine(backend, tokenizer=tokenizer)
    handles = [engine.submit(ids, config, tokenizer.stream_decoder(), index=n) for n, (ids, config) in enumerate(requests)]
    list(engine.drive(handles))
    return [h.completion for h in handles]


def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode_chat([{"role": "user", "content": text}])
            for text in ("Describe a person as JSON.", "Reply in JSON only, please!", "{")]


def parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_output_parses_and_validates_within_max_tokens(backend, tokenizer, name):
    schema = SCHEMAS[name]
    grammar = json_grammar(schema)
    requests = [(ids, generation_config(EOS, max_new_tokens=budget, temperature=temperature, seed=n, grammar=grammar))
                for n, (ids, budget, temperature) in enumerate(zip(prompts(tokenizer), (40, 48, 56), (0.0, 1.0, 0.7)))]
    for (_, config), completion in zip(requests, run(backend, tokenizer, requests)):
        assert len(completion.token_ids) <= config.max_new_tokens
        assert completion.finish_reason in ("grammar", "eos"), completion
        jsonschema.validate(json.loads(completion.text), schema if schema is not None else {"type": "object"})


def test_without_the_grammar_the_same_requests_are_not_json(backend, tokenizer):
    requests = [(ids, generation_config(EOS, max_new_tokens=budget, temperature=temperature, seed=n))
                for n, (ids, budget, temperature) in enumerate(zip(prompts(tokenizer), (40, 48, 56), (0.0, 1.0, 0.7)))]
    assert not any(parses(c.text) for c in run(backend, tokenizer, requests))


def test_a_tight_budget_still_closes_and_an_impossible_one_is_refused(backend, tokenizer):
    grammar = json_grammar(PERSON)
    ids = prompts(tokenizer)[0]
    engine = Engine(backend, tokenizer=tokenizer)
    with pytest.raises(GrammarError, match=r"cannot end within 8 tokens.*needs at least \d+"):
        engine.submit(ids, generation_config(EOS, max_new_tokens=8, grammar=grammar))
    needed = next(n for n in range(8, 200) if fits(engine, ids, n, grammar))
    requests = [(ids, generation_config(EOS, max_new_tokens=needed + extra, temperature=1.0, seed=extra,
                                        grammar=grammar)) for extra in (0, 1, 5)]
    for (_, config), completion in zip(requests, run(backend, tokenizer, requests)):
        assert len(completion.token_ids) <= config.max_new_tokens and completion.finish_reason == "grammar"
        jsonschema.validate(json.loads(completion.text), PERSON)


def fits(engine, ids, budget, grammar) -> bool:
    try:
        engine.admission.constrain(ids, generation_config(EOS, max_new_tokens=budget, grammar=grammar))
        return True
    except GrammarError:
        return False


def test_unconstrained_rows_are_untouched_by_a_constrained_row_beside_them(backend, tokenizer):
    a, b, c = prompts(tokenizer)
    free = [(a, generation_config(EOS, max_new_tokens=24)), (b, generation_config(EOS, max_new_tokens=24,
                                                                                   temperature=1.0, seed=5))]
    alone = run(backend, tokenizer, free)
    mixed = run(backend, tokenizer, free + [(c, generation_config(EOS, max_new_tokens=40,
                                                                  grammar=json_grammar(PERSON)))])
    assert [m.token_ids for m in mixed[:2]] == [x.token_ids for x in alone]
    assert parses(mixed[2].text) and not parses(alone[0].text)


def test_logprobs_are_the_models_before_the_mask(backend, tokenizer):
    ids = prompts(tokenizer)[0]
    constrained = run(backend, tokenizer, [(ids, generation_config(EOS, max_new_tokens=4, logprobs=2,
                                                                   grammar=json_grammar(None)))])[0]
    backend.reset()
    prompt = np.array([ids + [0] * (-len(ids) % 16)])  # (1, T) one chunk holds the prompt
    positions = np.where(np.arange(prompt.shape[1]) < len(ids), np.arange(prompt.shape[1]), -1)[None]
    padded = np.zeros((3, prompt.shape[1]), dtype=np.int64)
    padded[0] = prompt[0]
    pos = np.full((3, prompt.shape[1]), -1, dtype=np.int64)
    pos[0] = positions[0]
    logits = backend.step(padded, pos)[0, len(ids) - 1]  # (V,) the first token's logits
    expected = log_softmax(logits)
    first = constrained.token_ids[0]
    assert constrained.logprobs[0].logprob == pytest.approx(float(expected[first]), abs=1e-6)
    assert expected[first] < expected.max() - 1  # the grammar chose a token the model did not prefer
    assert [t for t, _ in constrained.logprobs[0].top] == list(np.argsort(-expected, kind="stable")[:2])


def test_the_mask_comes_after_the_bias(backend, tokenizer):
    ids = prompts(tokenizer)[0]
    brace = tokenizer.encode_verbatim('{"')[0]
    space = tokenizer.sp.piece_to_id("\u2581")
    grammar = json_grammar({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
                            "additionalProperties": False})  # no space anywhere
    biased = generation_config(EOS, max_new_tokens=30, logit_bias={space: 100.0}, grammar=grammar)
    completion = run(backend, tokenizer, [(ids, biased)])[0]
    assert space not in completion.token_ids and parses(completion.text)  # the grammar wins over +100
    control = run(backend, tokenizer, [(ids, dataclasses.replace(biased, grammar=None))])[0]
    assert set(control.token_ids) == {space}
    assert completion.token_ids[0] == brace


def test_a_bad_grammar_is_one_line_at_admission(backend, tokenizer):
    engine = Engine(backend, tokenizer=tokenizer)
    ids = prompts(tokenizer)[0]
    for grammar, match in (("start: foo", "unknown name"), (json_grammar({"type": "strin"}), "Invalid type")):
        with pytest.raises(GrammarError, match=match) as caught:
            engine.submit(ids, generation_config(EOS, grammar=grammar))
        assert "\n" not in str(caught.value) and caught.value.option == "grammar"
    with pytest.raises(RequestError, match="non-empty Lark grammar"):
        generation_config(EOS, grammar="  ")
    with pytest.raises(OptionError, match="needs the artifact's tokenizer"):
        Engine(backend).submit(ids, generation_config(EOS, grammar="start: \"a\""))
    assert engine.queue_depth == 0


def test_special_tokens_by_id_and_lark_rules(backend, tokenizer):
    ids = prompts(tokenizer)[0]
    tool_calls = tokenizer.sp.piece_to_id("[TOOL_CALLS]")
    grammar = f'start: <[{tool_calls}]> %json {json.dumps({"type": "array", "maxItems": 1})}'
    completion = run(backend, tokenizer, [(ids, generation_config(EOS, max_new_tokens=30, grammar=grammar))])[0]
    assert completion.token_ids[0] == tool_calls and isinstance(json.loads(completion.text), list)
    word = run(backend, tokenizer, [(ids, generation_config(EOS, max_new_tokens=10,
                                                            grammar='start: "yes" | "no"'))])[0]
    assert word.text in ("yes", "no") and word.finish_reason == "grammar"


def test_the_config_round_trips_with_its_grammar():
    config = generation_config(EOS, grammar=json_grammar(PERSON))
    assert GenerationConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    assert GenerationConfig.from_json(generation_config(EOS).to_json()).grammar is None


def test_without_llguidance_a_grammar_is_one_clear_line(backend, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    engine = Engine(backend, tokenizer=tokenizer)
    with pytest.raises(OptionError, match="needs llguidance"):
        engine.submit(prompts(tokenizer)[0], generation_config(EOS, grammar='start: "a"'))
    engine.submit(prompts(tokenizer)[0], generation_config(EOS))  # no grammar: llguidance is never asked for


def test_the_tiny_tokenizer_serves_grammars_too(tiny_checkpoint, tmp_path):
    from mixtral_export.runtimes.eager import EagerBackend

    tokenizer = Tokenizer.from_file(tiny_checkpoint)
    backend = EagerBackend.from_checkpoint(tiny_checkpoint, dict(batch=1, prefill_chunk=8))
    ids = tokenizer.encode("Once upon a time")
    completion = run(backend, tokenizer, [(ids, generation_config(EOS, max_new_tokens=80,
                                                                  grammar=json_grammar(PERSON)))])[0]
    jsonschema.validate(json.loads(completion.text), PERSON)
    shutil.rmtree(tmp_path, ignore_errors=True)
