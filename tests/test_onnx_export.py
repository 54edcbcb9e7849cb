"""ONNX export: one checked graph with only T free, one weights file, and an all-or-nothing build."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx
import pytest

from mixtral_export.graphs import onnx_export
from mixtral_export.artifact.contract import OUTPUT_NAMES
from mixtral_export.artifact.manifest import MANIFEST_NAME, check_compatible, load_manifest
from mixtral_export.graphs import artifact_folder
from mixtral_export.graphs.onnx_export import DATA_NAME, GRAPH_NAME, ExportError, export_onnx
from mixtral_export.artifact.config import MixtralConfig

SHAPES = dict(batch=2, prefill_chunk=8, cache_slots=32)  # what the tiny_onnx fixture was built with


def dims_of(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_graph_passes_the_checker_with_the_contracts_io(tiny_onnx):
    path = tiny_onnx / GRAPH_NAME
    onnx.checker.check_model(str(path))
    graph = onnx.load(str(path), load_external_data=False).graph
    shapes = load_manifest(tiny_onnx).shapes
    assert [v.name for v in graph.input] == ["input_ids", "positions", "cache_k.0", "cache_k.1", "cache_v.0",
                                             "cache_v.1", "cache_positions"]  # one cache input per layer
    assert [v.name for v in graph.output] == list(OUTPUT_NAMES)
    want = {**shapes.input_shapes(-1, span=-2), **shapes.output_shapes(-1)}  # -1 marks the chunk axis, -2 the span
    assert shapes.span_axis
    for value in (*graph.input, *graph.output):
        assert dims_of(value) == [{-1: "T", -2: "S"}.get(d, d) for d in want[value.name]], value.name
    float32, int64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}
    assert types == {"input_ids": int64, "positions": int64, "cache_k.0": float32, "cache_k.1": float32,
                     "cache_v.0": float32, "cache_v.1": float32, "cache_positions": int64, "logits": float32,
                     "new_k": float32, "new_v": float32}


def test_weights_live_in_one_external_file(tiny_onnx):
    graph = onnx.load(str(tiny_onnx / GRAPH_NAME), load_external_data=False).graph
    locations = {e.value for init in graph.initializer for e in init.external_data if e.key == "location"}
    assert locations == {DATA_NAME}
    inline = [init.name for init in graph.initializer if len(init.raw_data) > 4096]
    assert inline == []
    assert sorted(p.name for p in tiny_onnx.iterdir()) == sorted(
        [GRAPH_NAME, DATA_NAME, MANIFEST_NAME, "tokenizer.model", "generation_config.json"])
    assert (tiny_onnx / DATA_NAME).stat().st_size > 10 * (tiny_onnx / GRAPH_NAME).stat().st_size


def test_manifest_describes_the_build(tiny_onnx, tiny_checkpoint):
    manifest = load_manifest(tiny_onnx)
    check_compatible(manifest, MixtralConfig.from_json(tiny_checkpoint))
    s = manifest.shapes
    assert (s.batch, s.prefill_chunk, s.cache_slots, s.attention_window, s.dtype) == (2, 8, 32, 32, "float32")
    assert manifest.chunks == (8, 1) and manifest.graphs == {"step": GRAPH_NAME} and manifest.opset == 18
    assert manifest.tokenizer == "tokenizer.model"
    assert (tiny_onnx / "tokenizer.model").read_bytes() == (tiny_checkpoint / "tokenizer.model").read_bytes()
    assert manifest.eos_token_id == (2,) and manifest.bos_token_id == 1
    assert manifest.source == str(tiny_checkpoint.resolve()) and manifest.device is None
    assert {"torch", "onnx", "onnxruntime", "python"} <= set(manifest.tools)


def fake_exporter(source):
    """Stands in for torch's exporter: copies an already exported graph, so the rest runs for real."""
    def export_graph(model, shapes, path, opset, **options):
        shutil.copyfile(source / GRAPH_NAME, path)
        shutil.copyfile(source / DATA_NAME, path.parent / DATA_NAME)
        return None, None  # the data file's entry (hashed when the manifest is written), no quantization
    return export_graph


def failing_exporter(error: BaseException):
    def export_graph(model, shapes, path, opset, **options):
        path.write_bytes(b"half a graph")
        raise error
    return export_graph


@pytest.mark.parametrize("error", [RuntimeError("exporter crashed"), KeyboardInterrupt()])
def test_failed_export_leaves_nothing_behind(tiny_checkpoint, tmp_path, monkeypatch, error):
    monkeypatch.setattr(onnx_export, "export_graph", failing_exporter(error))
    with pytest.raises(type(error)):
        export_onnx(tiny_checkpoint, tmp_path / "art", **SHAPES)
    assert list(tmp_path.iterdir()) == []


def test_failed_rebuild_keeps_the_previous_artifact(tiny_onnx, tiny_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "art"
    shutil.copytree(tiny_onnx, out)
    monkeypatch.setattr(onnx_export, "export_graph", failing_exporter(RuntimeError("exporter crashed")))
    with pytest.raises(RuntimeError):
        export_onnx(tiny_checkpoint, out, **SHAPES)
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
    load_manifest(out)


def test_rebuild_replaces_an_artifact_and_reports_progress(tiny_onnx, tiny_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "art"
    shutil.copytree(tiny_onnx, out)
    (out / "tokenizer.model").write_bytes(b"stale")  # the old build, now damaged
    monkeypatch.setattr(onnx_export, "export_graph", fake_exporter(tiny_onnx))
    stages = []
    assert export_onnx(tiny_checkpoint, out, progress=stages.append, **SHAPES) == out
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
    assert load_manifest(out).files["tokenizer.model"] == load_manifest(tiny_onnx).files["tokenizer.model"]
    assert len(stages) >= 4 and stages[-1].startswith("wrote")


def test_refuses_to_overwrite_a_folder_that_is_not_an_artifact(tiny_checkpoint, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an artifact") as info:
        export_onnx(tiny_checkpoint, out, **SHAPES)
    assert "\n" not in str(info.value)
    assert (out / "notes.txt").read_text() == "keep me" and len(list(tmp_path.iterdir())) == 1


def test_output_under_a_file_gives_one_line(tiny_checkpoint, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ExportError, match="cannot write") as info:
        export_onnx(tiny_checkpoint, tmp_path / "file" / "art", **SHAPES)
    assert "\n" not in str(info.value) and str(tmp_path / "file" / "art") in str(info.value)


def test_permission_denied_gives_one_line(tiny_checkpoint, tmp_path, monkeypatch):
    real_mkdir = Path.mkdir

    def denied(self, *args, **kwargs):  # the artifact's temp folder only: root ignores chmod, so simulate it
        if ".partial-" in self.name:
            raise PermissionError(13, "Permission denied")
        return real_mkdir(self, *args, **kwargs)
    monkeypatch.setattr(artifact_folder.Path, "mkdir", denied)
    with pytest.raises(ExportError, match=r"cannot write the artifact there \(Permission denied\)") as info:
        export_onnx(tiny_checkpoint, tmp_path / "art", **SHAPES)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_output_folder_gives_one_line(tiny_checkpoint, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(ExportError, match="cannot write") as info:
            export_onnx(tiny_checkpoint, locked / "art", **SHAPES)
        assert "\n" not in str(info.value)
    finally:
        locked.chmod(0o700)


def test_unknown_dtype_is_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="dtype"):
        export_onnx(tiny_checkpoint, tmp_path / "art", dtype="int8", **SHAPES)
    assert list(tmp_path.iterdir()) == []
