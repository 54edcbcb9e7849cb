"""Export with placeholder weights: the artifact is byte for byte what a trace with the real weights
writes, every initializer is accounted for, and nothing it cannot account for is written."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from mixtral_export.graphs import placeholder_weights as pw
from mixtral_export.artifact.contract import StepShapes
from mixtral_export.graphs.onnx_export import DATA_NAME, GRAPH_NAME, check_graph, export_onnx, step_graph
from mixtral_export.checkpoint import load_model
from mixtral_export.artifact.config import MixtralConfig
from tests.reference_models import hf_reference

SHAPES = dict(batch=2, prefill_chunk=8, cache_slots=32)


def reference_artifact(checkpoint, out, dtype, routing):
    """Today's path: load the model, trace it with its weights (optimize=True), let onnx_ir save them."""
    config = MixtralConfig.from_json(checkpoint / "config.json").replace(dtype=dtype)
    shapes = StepShapes.for_config(config, dtype=dtype, slide=False, span_axis=True, **SHAPES)
    model = load_model(checkpoint, dtype=dtype, attention_window=shapes.attention_window, routing=routing)
    out.mkdir()
    ir.save(step_graph(model, shapes, 18), str(out / GRAPH_NAME), external_data=DATA_NAME)
    check_graph(out / GRAPH_NAME, shapes)  # export_onnx runs it too, and it rewrites the graph with shapes
    return out


def assert_same_artifact(ours, theirs):
    for name in (GRAPH_NAME, DATA_NAME):
        a, b = (ours / name).read_bytes(), (theirs / name).read_bytes()
        assert len(a) == len(b) and a == b, name


@pytest.mark.parametrize("routing", ["dense", "gather"])
def test_tiny_artifact_is_byte_for_byte_the_real_trace(tiny_checkpoint, tmp_path, routing):
    ours = export_onnx(tiny_checkpoint, tmp_path / "ours", dtype="float32", routing=routing, **SHAPES)
    assert_same_artifact(ours, reference_artifact(tiny_checkpoint, tmp_path / "theirs", "float32", routing))


@pytest.mark.parametrize("saved, dtype, routing, overrides", [
    (torch.float32, "bfloat16", "dense", dict(max_shard_size="60KB")),  # shards, cast down
    (torch.bfloat16, "float32", "gather", {}),  # cast up
    (torch.float16, "float16", "dense", dict(tie_word_embeddings=True)),  # tied head: one tensor, two uses
    (torch.float32, "float16", "gather", dict(num_hidden_layers=1, num_local_experts=8)),
])
def test_reference_checkpoints_export_byte_for_byte(tmp_path, saved, dtype, routing, overrides):
    checkpoint = tmp_path / "checkpoint"
    hf_reference(checkpoint, dtype=saved, **overrides)
    ours = export_onnx(checkpoint, tmp_path / "ours", dtype=dtype, routing=routing, **SHAPES)
    assert_same_artifact(ours, reference_artifact(checkpoint, tmp_path / "theirs", dtype, routing))


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_experts_written_one_row_at_a_time_are_byte_for_byte(tmp_path, monkeypatch, layout):
    """Every stacked parameter read row by row (one expert, one vocab entry...), from both layouts:
    per-expert tensors each fill part of a row, a fused v5 tensor is read a byte range at a time."""
    from safetensors.torch import save_file

    checkpoint = tmp_path / "checkpoint"
    model = hf_reference(checkpoint)
    if layout == "fused":
        (checkpoint / "model.safetensors").unlink()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint / "model.safetensors"))
    monkeypatch.setattr(pw, "PIECE_BYTES", 1)
    ours = export_onnx(checkpoint, tmp_path / "ours", dtype="bfloat16", routing="dense", **SHAPES)
    assert_same_artifact(ours, reference_artifact(checkpoint, tmp_path / "theirs", "bfloat16", "dense"))


@pytest.mark.parametrize("saved", [torch.bfloat16, torch.float32])
def test_writes_in_runs_smaller_than_a_row_are_byte_for_byte(tmp_path, monkeypatch, saved):
    """The buffer ring's runs far below a row (700 bytes: gathered fc1 row pairs and fc2 slice rows
    one at a time, casts split mid-row, copy_file_range chunks hashed from maps at unaligned
    offsets) give the same file as one run per tensor."""
    from mixtral_export.graphs import weights_file as wf

    checkpoint = tmp_path / "checkpoint"
    hf_reference(checkpoint, dtype=saved)
    monkeypatch.setattr(wf, "CHUNK_BYTES", 700)
    ours = export_onnx(checkpoint, tmp_path / "ours", dtype="float32", routing="gather", **SHAPES)
    assert_same_artifact(ours, reference_artifact(checkpoint, tmp_path / "theirs", "float32", "gather"))


@pytest.mark.parametrize("head, dtype, routing", [
    ("sequence-classification", "float32", "dense"),
    ("question-answering", "bfloat16", "gather"),  # a cast, the sliced experts, a bias
])
def test_head_graphs_are_byte_for_byte_the_real_trace(tmp_path, head, dtype, routing):
    """export --head traces with placeholder weights too: the same graph and data file as tracing
    the loaded HeadModel."""
    from mixtral_export.artifact.contract import HeadShapes
    from mixtral_export.graphs.onnx_heads import check_head_graph, export_head_graph, export_head_onnx
    from mixtral_export.checkpoint import load_head_model
    from tests.reference_models import hf_head_reference

    checkpoint = tmp_path / "checkpoint"
    hf_head_reference(checkpoint, head, pad_token_id=0)
    ours = export_head_onnx(checkpoint, tmp_path / "ours", dtype=dtype, batch=2, seq_len=12, routing=routing)
    model = load_head_model(checkpoint, dtype=dtype, routing=routing)
    shapes = HeadShapes(head=head, batch=2, seq_len=12, hidden_size=model.body.config.hidden_size,
                        num_labels=model.head.num_labels, dtype=dtype)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    export_head_graph(model, shapes, theirs / GRAPH_NAME, 18)
    check_head_graph(theirs / GRAPH_NAME, shapes)  # export_head_onnx runs it too; it rewrites the graph
    assert_same_artifact(ours, theirs)


def test_every_traced_initializer_has_a_recipe(tiny_checkpoint):
    """The tiny model's large parameters: the embedding and experts as stored, the head transposed."""
    from mixtral_export.graphs.onnx_export import placeholder_model
    from mixtral_export.checkpoint import ParameterReader

    config = MixtralConfig.from_json(tiny_checkpoint / "config.json")
    shapes = StepShapes.for_config(config, dtype="float32", slide=False, **SHAPES)
    graph = step_graph(placeholder_model(config, shapes, "dense"), shapes, 18,
                       ParameterReader(tiny_checkpoint, config).read)
    recipes = {v.name: str(v.meta[pw.RECIPE]) for v in graph.graph.initializers.values() if pw.RECIPE in v.meta}
    head = [name for name, recipe in recipes.items() if recipe == "lm_head.weight.permute(1, 0)"]
    assert len(head) == 1 and graph.graph.initializers[head[0]].shape == ir.Shape([64, 1000])
    assert {name: recipe for name, recipe in recipes.items() if name not in head} == {
        "embed_tokens.weight": "embed_tokens.weight",
        **{f"layers.{n}.moe.{w}": f"layers.{n}.moe.{w}" for n in range(2) for w in ("w13", "w2")}}
    for value in graph.graph.initializers.values():  # the rest: small parameters and constants, in memory
        assert value.name in recipes or not isinstance(value.const_value, ir.LazyTensor)


def planted(shape=(64, 256)):
    """A one-initializer graph whose parameter carries a tracer, as `plant` leaves it."""
    value = ir.Value(name="w", shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT))
    value.const_value = ir.Tensor(np.zeros(shape, np.float32), name="w")
    graph = ir.Graph([], [value], nodes=[], initializers=[value], opset_imports={"": 18})
    model = ir.Model(graph, ir_version=10)
    tracers = pw.plant(model, {"w": shape}, read=lambda name: pytest.fail("a large parameter was read"))
    return model, value, tracers


def test_a_transposed_tracer_resolves_to_its_permutation():
    model, value, tracers = planted()
    value.const_value = ir.Tensor(value.const_value.numpy().T, name="w")  # what folding a Transpose leaves
    weights = torch.arange(64 * 256, dtype=torch.float32).reshape(64, 256)
    recipes = pw.resolve(model, tracers, {"w": (64, 256)}, read=lambda name: weights)
    assert str(recipes["w"]) == "w.permute(1, 0)"
    assert np.array_equal(value.const_value.numpy(), weights.numpy().T)


def test_a_sliced_tracer_fails_loudly():
    model, value, tracers = planted()
    value.const_value = ir.Tensor(value.const_value.numpy()[:32], name="w")
    with pytest.raises(pw.PlaceholderError, match="initializer w .* is not a permutation"):
        pw.resolve(model, tracers, {"w": (64, 256)}, read=lambda name: None)


def test_a_value_computed_from_a_tracer_fails_loudly():
    model, value, tracers = planted()
    computed = ir.Value(name="scaled", shape=ir.Shape([64, 256]), type=ir.TensorType(ir.DataType.FLOAT))
    computed.const_value = ir.Tensor(np.ones((64, 256), np.float32), name="scaled")
    computed.meta[pw.FOLDED_FROM] = {"w"}
    model.graph.register_initializer(computed)
    with pytest.raises(pw.PlaceholderError, match="scaled is computed from w"):
        pw.resolve(model, tracers, {"w": (64, 256)}, read=lambda name: None)


def test_stored_tensors_are_copied_file_to_file_or_written_the_same(tiny_checkpoint, tmp_path, monkeypatch):
    """Parameters stored as the graph needs them go through copy_file_range; where the kernel cannot
    copy (another filesystem), the bytes read for the hash are written instead: the same file."""
    from mixtral_export.graphs import weights_file as wf

    copied = []
    copy_range = wf.copy_range
    monkeypatch.setattr(wf, "copy_range", lambda entry, *rest: copied.append(entry.name) or copy_range(entry, *rest))
    kernel = export_onnx(tiny_checkpoint, tmp_path / "kernel", dtype="float32", routing="dense", **SHAPES)
    assert any(".experts." in name for name in copied) and "model.embed_tokens.weight" in copied
    monkeypatch.setattr(wf, "KERNEL_COPY", False)
    written = export_onnx(tiny_checkpoint, tmp_path / "written", dtype="float32", routing="dense", **SHAPES)
    assert_same_artifact(kernel, written)


def test_gathered_experts_are_written_from_the_checkpoint_or_through_buffers_the_same(tiny_checkpoint, tmp_path,
                                                                                       monkeypatch):
    """A gathered layout stored in the checkpoint's dtype goes to the kernel as byte ranges of its
    shards (pwritev from maps, hashed from the data file); without pwritev it fills the buffer
    ring instead: the same file and the same sha256."""
    from mixtral_export.graphs import weights_file as wf

    runs = []
    write_pieces = wf.write_pieces
    monkeypatch.setattr(wf, "write_pieces", lambda chunks, ring: runs.append(1) or write_pieces(chunks, ring))
    monkeypatch.setattr(wf, "CHUNK_BYTES", 1000)  # several runs per virtual expert, rows interleaved across them
    mapped = export_onnx(tiny_checkpoint, tmp_path / "mapped", dtype="float32", routing="gather", **SHAPES)
    assert len(runs) == 2 * 2  # fc1 and fc2 of each of the 2 layers
    monkeypatch.setattr(wf, "GATHER_WRITE", False)
    buffered = export_onnx(tiny_checkpoint, tmp_path / "buffered", dtype="float32", routing="gather", **SHAPES)
    assert_same_artifact(mapped, buffered)
    from mixtral_export.artifact.manifest import load_manifest

    assert load_manifest(mapped).files[DATA_NAME] == load_manifest(buffered).files[DATA_NAME]
