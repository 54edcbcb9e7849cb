"""The manifest side of TensorRT engines, without TensorRT or a GPU: an engine is listed with its
build record, hashed like every file, and refused on a machine with another TensorRT or GPU.

Built over small stand-in files (no export), so every check runs in milliseconds.
"""
from __future__ import annotations

import json

import pytest

from mixtral_export.artifact.contract import StepShapes
from mixtral_export.artifact.manifest import MANIFEST_NAME, ManifestError, load_manifest, set_engine, write_manifest
from mixtral_export.artifact.engine_record import (
    ENGINE_NAME, EngineMismatch, check_engine_record, engine_spans, profile_count, profile_for, profile_plan,
    recorded_profiles,
)
from mixtral_export.graphs.trt_engine import TrtBuildError, build_engine
from mixtral_export.artifact.config import MixtralConfig

CONFIG = MixtralConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=32,
                       num_local_experts=4, eos_token_id=(2,))
RECORD = {"tensorrt": "10.3.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "precision": "fp16",
          "profiles": {"8": 0, "1": 1}, "strongly_typed": False}


def artifact(tmp_path, dtype="float32", routing="dense"):
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"graph" * 100)
    (folder / "model.onnx.data").write_bytes(bytes(range(256)) * 64)
    shapes = StepShapes.for_config(CONFIG.replace(dtype=dtype), batch=2, prefill_chunk=8)
    write_manifest(folder, kind="onnx", config=CONFIG.replace(dtype=dtype), shapes=shapes,
                   graphs={"step": "model.onnx"}, opset=18, routing=routing)
    return folder


@pytest.fixture
def with_engine(tmp_path):
    folder = artifact(tmp_path)
    (folder / ENGINE_NAME).write_bytes(b"plan" * 1000)
    set_engine(folder, ENGINE_NAME, RECORD)
    return folder


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_an_engine_is_listed_with_its_record_and_hash(with_engine):
    manifest = load_manifest(with_engine)
    assert manifest.engines == {ENGINE_NAME: RECORD}
    assert manifest.files[ENGINE_NAME].size == 4000 and len(manifest.files[ENGINE_NAME].digest) == 64
    assert {"model.onnx", "model.onnx.data"} <= set(manifest.files)  # the rest is untouched
    assert not [p for p in with_engine.iterdir() if p.name.startswith(".")]  # no temp file left


def test_the_matching_machine_passes():
    check_engine_record(RECORD, "10.3.0", "NVIDIA H100 80GB HBM3", "9.0")


@pytest.mark.parametrize("trt_version, gpu, capability, expected", [
    ("10.8.0", "NVIDIA H100 80GB HBM3", "9.0", r"built with TensorRT 10\.3\.0 \(here: 10\.8\.0\)"),
    ("10.3.0", "NVIDIA A100-SXM4-80GB", "8.0",
     r"built with a NVIDIA H100 80GB HBM3 with compute capability 9\.0 \(here: NVIDIA A100-SXM4-80GB, 8\.0\)"),
    ("10.3.0", "NVIDIA H100 80GB HBM3", "9.1", r"compute capability 9\.0 \(here: NVIDIA H100 80GB HBM3, 9\.1\)"),
    ("10.8.0", "NVIDIA L4", "8.9", r"TensorRT 10\.3\.0 \(here: 10\.8\.0\) for a NVIDIA H100 80GB HBM3"),
])
def test_a_recorded_engine_for_another_machine_is_refused(with_engine, trt_version, gpu, capability, expected):
    record = load_manifest(with_engine).engines[ENGINE_NAME]  # the record as the backend reads it
    with pytest.raises(EngineMismatch, match=expected) as info:
        check_engine_record(record, trt_version, gpu, capability, where=with_engine / ENGINE_NAME)
    message = one_line(info)
    assert message.startswith(f"{with_engine / ENGINE_NAME}: ") and "rebuild it here" in message
    assert isinstance(info.value, ManifestError)  # the CLI prints it as one line


def test_a_modified_engine_is_refused(with_engine):
    plan = with_engine / ENGINE_NAME
    raw = bytearray(plan.read_bytes())
    raw[10] ^= 1
    plan.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match=f"{ENGINE_NAME}: sha256 does not match") as info:
        load_manifest(with_engine)
    one_line(info)


def test_dropping_the_engine_unlists_it_and_leaves_the_graph_alone(with_engine):
    set_engine(with_engine, ENGINE_NAME, None)
    manifest = load_manifest(with_engine)
    assert manifest.engines == {} and ENGINE_NAME not in manifest.files
    set_engine(with_engine, "model.onnx", None)  # not an engine: nothing to drop
    assert "model.onnx" in load_manifest(with_engine).files


def test_an_incomplete_record_is_refused(with_engine):
    with pytest.raises(ManifestError, match="an engine record needs gpu"):
        set_engine(with_engine, ENGINE_NAME, {k: v for k, v in RECORD.items() if k != "gpu"})
    path = with_engine / MANIFEST_NAME
    raw = json.loads(path.read_text())
    del raw["engines"][ENGINE_NAME]["tensorrt"]
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=f"the engine record of '{ENGINE_NAME}' lacks tensorrt"):
        load_manifest(with_engine)
    del raw["files"][ENGINE_NAME]
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=f"the engine '{ENGINE_NAME}' is not listed under files"):
        load_manifest(with_engine)


def test_manifests_without_engines_still_load(tmp_path):
    folder = artifact(tmp_path)
    assert "engines" not in json.loads((folder / MANIFEST_NAME).read_text())
    assert load_manifest(folder).engines == {}


@pytest.mark.parametrize("dtype, routing, precision, message", [
    ("float16", "dense", "fp32", "a float16 graph builds only as fp16"),
    ("bfloat16", "dense", "fp16", "a bfloat16 graph builds only as bf16"),
    ("float32", "dense", "int8", "precision 'int8' is not one of fp32, fp16, bf16"),
    ("float32", "gather", "fp32", "'gather' routing uses ONNX Runtime's com.microsoft.MoE.*--routing dense"),
])
def test_build_refuses_before_needing_tensorrt(tmp_path, dtype, routing, precision, message):
    with pytest.raises(TrtBuildError, match=message) as info:
        build_engine(artifact(tmp_path, dtype, routing), precision=precision)
    one_line(info)


def span_shapes(slots: int, span_axis: bool = True) -> StepShapes:
    return StepShapes.for_config(CONFIG.replace(sliding_window=None), batch=2, prefill_chunk=(4, 8),
                                 cache_slots=slots, span_axis=span_axis)


def test_the_profile_plan_is_one_exact_profile_per_chunk_length_and_span_bucket():
    shapes = span_shapes(256)
    plan = profile_plan(shapes, shapes.chunks)
    assert [(chunk, span) for chunk, span, _ in plan] == [(8, 64), (8, 128), (8, 256), (4, 64), (4, 128), (4, 256),
                                                          (1, 64), (1, 128), (1, 256)]
    for chunk, span, exact in plan:
        assert exact["input_ids"] == (2, chunk) and exact["cache_positions"] == (2, span)
        assert exact["cache_k.1"] == exact["cache_v.0"] == (2, CONFIG.num_key_value_heads, span, CONFIG.head_dim)
    record = recorded_profiles(plan)
    assert record == {"8": {"64": 0, "128": 1, "256": 2}, "4": {"64": 3, "128": 4, "256": 5},
                      "1": {"64": 6, "128": 7, "256": 8}}
    old = span_shapes(256, span_axis=False)  # a graph without the span axis: the whole ring per T
    assert recorded_profiles(profile_plan(old, old.chunks)) == {"8": {"256": 0}, "4": {"256": 1}, "1": {"256": 2}}


def test_the_runtime_picks_the_profile_of_the_steps_span():
    """The span each step needs (the torch ring's rule, the ONNX ring's) selects the profile; a record from
    before spans has one whole-ring profile per T and takes no other span."""
    import numpy as np
    import torch

    from mixtral_export.runtimes.torch_ring import TorchRing

    shapes = span_shapes(256)
    record = recorded_profiles(profile_plan(shapes, shapes.chunks))
    ring = TorchRing(shapes, torch.device("cpu"), spans=True)
    chosen = []
    for position in (0, 63, 64, 127, 128, 255, 300):  # row 0 decodes; row 1 sits out
        positions = np.array([[position], [-1]])
        ring.fit(ring.span_needed(positions))
        ring.write(torch.zeros(shapes.cache_shape(1)[:3] + (1, shapes.head_dim)),
                   torch.zeros(shapes.cache_shape(1)[:3] + (1, shapes.head_dim)), positions)
        chosen.append((ring.span, profile_for(record, 1, ring.span, 256)))
    assert chosen == [(64, 6), (64, 6), (128, 7), (128, 7), (256, 8), (256, 8), (256, 8)]  # 300 wrapped: S
    assert profile_for(record, 8, 128, 256) == 1 and profile_count(record) == 9
    assert engine_spans(record, 4, 256) == (64, 128, 256)
    with pytest.raises(ValueError, match="no profile for T=1 over 32 slots"):
        profile_for(record, 1, 32, 256)
    before_spans = {"8": 0, "4": 1, "1": 2}
    assert profile_for(before_spans, 4, 256, 256) == 1 and engine_spans(before_spans, 4, 256) == (256,)
    with pytest.raises(ValueError, match="whole ring"):
        profile_for(before_spans, 1, 64, 256)
    assert profile_count(before_spans) == 3


@pytest.mark.parametrize("profiles, count, message", [
    ({"8": {"64": 0, "128": 1, "256": 2}, "4": {"64": 3, "128": 4, "256": 5}, "1": {"64": 6, "128": 7, "256": 8}},
     9, None),
    ({"8": 0, "4": 1, "1": 2}, 3, None),  # an engine built before spans: the whole ring
    ({"8": {"64": 0, "128": 1, "256": 2}, "4": {"64": 3, "128": 4, "256": 5}, "1": {"64": 6, "128": 7, "256": 8}},
     8, "the engine has 8 profiles"),
    ({"8": 0, "1": 1}, 2, "T in \\[1, 8\\], the artifact serves T in \\[1, 4, 8\\]"),
    ({"8": {"64": 0, "256": 1}, "4": {"64": 2, "256": 3}, "1": {"64": 4, "256": 5}}, 6, "take spans \\[64, 256\\]"),
])
def test_an_engines_profile_record_must_fit_the_artifact(profiles, count, message, tmp_path):
    pytest.importorskip("torch")
    from mixtral_export.runtimes.trt import check_profile_record

    if message is None:
        check_profile_record(profiles, count, span_shapes(256), tmp_path / ENGINE_NAME)
        return
    with pytest.raises(ManifestError, match=message) as error:
        check_profile_record(profiles, count, span_shapes(256), tmp_path / ENGINE_NAME)
    one_line(error)
