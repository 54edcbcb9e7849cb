"""manifest.json: a round trip, and one clear error per damaged or mismatched artifact.

Built over small stand-in files (no export, no torch), so every check runs in milliseconds.
"""
from __future__ import annotations

import json

import pytest

from mixtral_export.artifact.contract import HeadShapes, StepShapes
from mixtral_export.artifact.manifest import (FORMAT_VERSION, MANIFEST_NAME, OLDEST_READ, HeadManifest, Manifest,
                                              ManifestError, check_compatible, load_manifest, write_manifest)
from mixtral_export.artifact.config import MixtralConfig

CONFIG = MixtralConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=32,
                       num_local_experts=4, eos_token_id=(2,))
SHAPES = StepShapes.for_config(CONFIG, batch=2, prefill_chunk=8)


@pytest.fixture
def artifact(tmp_path):
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"graph" * 100)
    (folder / "model.onnx.data").write_bytes(bytes(range(256)) * 64)
    (folder / "tokenizer.model").write_bytes(b"pieces")
    write_manifest(folder, kind="onnx", config=CONFIG, shapes=SHAPES, graphs={"step": "model.onnx"}, opset=18,
                   tokenizer="tokenizer.model", eos_token_id=(2, 7))
    return folder


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(ManifestError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_round_trip(artifact):
    manifest = load_manifest(artifact)
    assert manifest.config == CONFIG and manifest.shapes == SHAPES
    assert manifest.kind == "onnx" and manifest.format_version == FORMAT_VERSION and manifest.opset == 18
    assert manifest.chunks == (8, 1)
    assert manifest.graph_path() == artifact / "model.onnx"
    assert manifest.tokenizer == "tokenizer.model"
    assert manifest.bos_token_id == 1 and manifest.eos_token_id == (2, 7)
    assert set(manifest.files) == {"model.onnx", "model.onnx.data", "tokenizer.model"}
    assert manifest.files["model.onnx.data"].size == 256 * 64
    assert len(manifest.files["model.onnx"].digest) == 64
    assert manifest.tools["python"] and manifest.created
    inputs = {e["name"]: e for e in manifest.io["inputs"]}
    assert inputs["cache_k.1"]["shapes"] == {"8": [2, 2, 32, 16], "1": [2, 2, 32, 16]}  # (B, Hkv, S, D) per layer
    assert [name for name in inputs if name.startswith("cache_")] == ["cache_k.0", "cache_k.1", "cache_v.0",
                                                                      "cache_v.1", "cache_positions"]
    assert inputs["input_ids"]["shapes"] == {"8": [2, 8], "1": [2, 1]}
    assert [e["dtype"] for e in manifest.io["outputs"]] == ["float32", "float32", "float32"]


def test_tampered_byte_names_the_file(artifact):
    data = artifact / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[1000] ^= 0xFF
    data.write_bytes(bytes(raw))
    message = error_of(load_manifest, artifact)
    assert "model.onnx.data" in message and "sha256" in message
    load_manifest(artifact, verify_files=False)  # the cheap check sees sizes only, by design


def test_truncated_graph_is_refused_even_without_hashing(artifact):
    graph = artifact / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:-1])
    message = error_of(load_manifest, artifact, verify_files=False)
    assert "model.onnx" in message and "size" in message


def test_missing_listed_file(artifact):
    (artifact / "tokenizer.model").unlink()
    assert "tokenizer.model" in error_of(load_manifest, artifact)


def test_extra_graph_file_is_refused(artifact):
    (artifact / "old.onnx").write_bytes(b"stale")
    assert "old.onnx" in error_of(load_manifest, artifact)


def test_unrelated_extra_file_is_tolerated(artifact):
    (artifact / "NOTES.txt").write_text("hello")
    load_manifest(artifact)


def test_missing_manifest(artifact):
    (artifact / MANIFEST_NAME).unlink()
    assert MANIFEST_NAME in error_of(load_manifest, artifact)


def test_invalid_json(artifact):
    (artifact / MANIFEST_NAME).write_text("{not json")
    assert "not valid JSON" in error_of(load_manifest, artifact)


def test_unknown_format_version(artifact):
    path = artifact / MANIFEST_NAME
    raw = json.loads(path.read_text())
    raw["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(raw))
    assert "format_version" in error_of(load_manifest, artifact)


def test_an_older_format_asks_for_a_new_export(artifact):
    path = artifact / MANIFEST_NAME
    raw = json.loads(path.read_text())
    raw["format_version"] = OLDEST_READ - 1
    path.write_text(json.dumps(raw))
    assert "older mixtral-export" in error_of(load_manifest, artifact) and "export the artifact again" in \
        error_of(load_manifest, artifact)


def test_file_names_must_stay_inside_the_artifact(artifact):
    path = artifact / MANIFEST_NAME
    raw = json.loads(path.read_text())
    raw["files"]["../escape"] = {"size": 1, "sha256": "0" * 64}
    path.write_text(json.dumps(raw))
    assert "../escape" in error_of(load_manifest, artifact)


def test_shapes_that_contradict_the_config_are_refused(artifact):
    path = artifact / MANIFEST_NAME
    raw = json.loads(path.read_text())
    raw["shapes"]["num_layers"] = 3
    path.write_text(json.dumps(raw))
    assert "num_layers" in error_of(load_manifest, artifact)


def test_another_config_is_refused_naming_the_field(artifact):
    manifest = load_manifest(artifact)
    check_compatible(manifest, CONFIG)
    check_compatible(manifest, CONFIG.replace(dtype="bfloat16"))  # the build's dtype is its own choice
    message = error_of(check_compatible, manifest, CONFIG.replace(num_hidden_layers=3))
    assert "num_hidden_layers" in message and "2" in message and "3" in message
    message = error_of(check_compatible, manifest, CONFIG.replace(rope_theta=10000.0, sliding_window=None))
    assert "rope_theta" in message and "sliding_window" in message


def test_several_prefill_chunks_round_trip_and_an_older_manifest_has_one(tmp_path, artifact):
    shapes = StepShapes.for_config(CONFIG, batch=2, prefill_chunk=(32, 8, 8))
    assert shapes.prefill_chunks == (8, 32) and shapes.prefill_chunk == 32 and shapes.chunks == (32, 8, 1)
    folder = tmp_path / "several"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"graph")
    write_manifest(folder, kind="onnx", config=CONFIG, shapes=shapes, graphs={"step": "model.onnx"}, opset=18,
                   tokenizer=None, eos_token_id=(2,))
    manifest = load_manifest(folder)
    assert manifest.shapes == shapes and manifest.chunks == (32, 8, 1)
    assert {e["name"]: e for e in manifest.io["inputs"]}["input_ids"]["shapes"] == {"32": [2, 32], "8": [2, 8],
                                                                                     "1": [2, 1]}
    path = artifact / MANIFEST_NAME  # written before prefill_chunks existed: no such field
    raw = json.loads(path.read_text())
    del raw["shapes"]["prefill_chunks"]
    path.write_text(json.dumps(raw))
    assert load_manifest(artifact).shapes == SHAPES and SHAPES.prefill_chunks == (8,)
    raw["chunks"] = [8, 4, 1]  # a chunk the shapes do not serve
    path.write_text(json.dumps(raw))
    assert "chunks [8, 4, 1]" in error_of(load_manifest, artifact)


@pytest.mark.parametrize("lengths, message", [((8, 0), "positive"), ((), "at least one")])
def test_bad_prefill_chunks_are_refused(lengths, message):
    from mixtral_export.artifact.contract import ContractError

    with pytest.raises(ContractError, match=message):
        StepShapes.for_config(CONFIG, prefill_chunk=lengths)
    with pytest.raises(ContractError, match="largest"):
        StepShapes(batch=1, prefill_chunk=8, cache_slots=32, num_layers=2, num_kv_heads=2, head_dim=16,
                   vocab_size=1000, dtype="float32", attention_window=32, prefill_chunks=(8, 16))


def test_prefill_length_is_the_shortest_chunk_that_holds_the_piece():
    shapes = StepShapes.for_config(CONFIG, prefill_chunk=(8, 32), cache_slots=64)
    assert [shapes.prefill_length(n) for n in (1, 8, 9, 32, 33, 100)] == [8, 8, 32, 32, 32, 32]
    assert StepShapes.for_config(CONFIG, prefill_chunk=(8, 100), cache_slots=64).prefill_chunks == (8, 64)


HEAD_SHAPES = HeadShapes(head="token-classification", batch=2, seq_len=12, hidden_size=CONFIG.hidden_size,
                         num_labels=3, dtype="float32")


@pytest.fixture
def head_artifact(tmp_path):
    folder = tmp_path / "head-artifact"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"graph" * 100)
    write_manifest(folder, kind="onnx", config=CONFIG, shapes=HEAD_SHAPES, graphs={"head": "model.onnx"}, opset=18,
                   labels=("O", "B-X", "I-X"))
    return folder


def test_each_kind_loads_as_its_own_class(artifact, head_artifact):
    """One read tells the kinds apart: a step artifact is a Manifest with StepShapes and nothing of a
    head; a head artifact is a HeadManifest with its HeadShapes, head and labels."""
    step, head = load_manifest(artifact), load_manifest(head_artifact)
    assert type(step) is Manifest and isinstance(step.shapes, StepShapes)
    assert not hasattr(step, "head") and not hasattr(step, "labels")
    assert type(head) is HeadManifest and head.shapes == HEAD_SHAPES
    assert head.head == "token-classification" and head.labels == ("O", "B-X", "I-X")
    assert head.chunks == (12,) and head.graph_path("head") == head_artifact / "model.onnx"
    assert not hasattr(head, "quantization")


def test_head_manifest_json_keeps_its_format(head_artifact):
    """A head manifest's JSON is what earlier versions wrote (head and labels beside the common
    fields), so artifacts already on disk load unchanged; a step manifest records neither key."""
    raw = json.loads((head_artifact / MANIFEST_NAME).read_text())
    assert raw["head"] == "token-classification" and raw["labels"] == ["O", "B-X", "I-X"]
    assert raw["shapes"] == {"head": "token-classification", "batch": 2, "seq_len": 12, "hidden_size": 64,
                             "num_labels": 3, "dtype": "float32"}
    assert raw["chunks"] == [12] and raw["graphs"] == {"head": "model.onnx"}


def test_step_manifest_records_no_head(artifact):
    raw = json.loads((artifact / MANIFEST_NAME).read_text())
    assert "head" not in raw and "labels" not in raw


def test_head_that_differs_from_its_shapes_is_refused(head_artifact):
    path = head_artifact / MANIFEST_NAME
    raw = json.loads(path.read_text())
    raw["head"] = "sequence-classification"
    path.write_text(json.dumps(raw))
    assert "differs from shapes.head" in error_of(load_manifest, head_artifact)


def test_labels_must_match_the_classifier(head_artifact):
    path = head_artifact / MANIFEST_NAME
    raw = json.loads(path.read_text())
    raw["labels"] = ["O"]
    path.write_text(json.dumps(raw))
    assert "1 labels" in error_of(load_manifest, head_artifact)
