"""A checkpoint's non-generative head -> an ONNX head-graph artifact (model.onnx + .data + manifest.json).

The bare model, sequence / token classification and question answering run one static (B, T)
batch with no cache (graphs/contract.py, HeadShapes), so their graph has no free axis at all.
Tracing with placeholder weights (the checkpoint is read only as the weights file is written,
one tensor at a time), external data, the graph checks and the atomic folder are the step
export's (graphs/onnx_export.py, graphs/artifact_folder.py); the manifest records the head, its
labels and its I/O. The causal LM stays the step graph: `export_onnx`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from mixtral_export.graphs.artifact_folder import ExportError, building, finish
from mixtral_export.artifact.contract import DTYPES, HEAD_INPUT_NAMES, HeadShapes
from mixtral_export.graphs.onnx_export import DATA_NAME, GRAPH_NAME, check_onnx_file, export_config, fake_parameters, save_graph, trace
from mixtral_export.graphs.onnx_moe import lay_out_experts, route_through_moe_nodes


def export_head_onnx(checkpoint_folder: str | Path, out_dir: str | Path, head: str | None = None,
                     dtype: str | None = "float32", batch: int = 1, seq_len: int = 128, opset: int = 18,
                     progress: Callable[[str], None] | None = None, routing: str = "dense") -> Path:
    """Export the checkpoint's head (config.json's, or `head`) as a static (batch, seq_len) graph."""
    checkpoint, out = Path(checkpoint_folder), Path(out_dir)
    say = progress or (lambda stage: None)
    config = export_config(checkpoint, out, dtype, routing)
    dtype = config.dtype
    with building(out) as tmp:
        from mixtral_export.checkpoint import ParameterReader, checked_head_tensors

        chosen, tensors, targets = checked_head_tensors(checkpoint, config, head)
        reader = ParameterReader(checkpoint, config, (tensors, targets))  # headers only: none read yet
        model = placeholder_head_model(config, chosen, routing)
        shapes = HeadShapes(head=chosen.kind, batch=batch, seq_len=seq_len, hidden_size=config.hidden_size,
                            num_labels=chosen.num_labels, dtype=dtype)
        labels = chosen.labels
        say(f"exporting the {shapes.head} head {GRAPH_NAME} (opset {opset}, B={batch}, T={seq_len}, {routing} MoE) "
            f"with placeholder weights")
        try:
            data = export_head_graph(model, shapes, tmp / GRAPH_NAME, opset, weights=reader.read, progress=say)
        except ExportError as error:  # name the artifact's files where the user will look for them
            raise ExportError(str(error).replace(str(tmp), str(out))) from None
        say("checking the graph")
        check_head_graph(tmp / GRAPH_NAME, shapes)
        say("writing the manifest")
        finish(tmp, checkpoint, config, kind="onnx", shapes=shapes, graphs={"head": GRAPH_NAME}, opset=opset,
               routing=routing, labels=labels, hashed={DATA_NAME: data} if data is not None else None)
    say(f"wrote {out}")
    return out


def placeholder_head_model(config, head, routing: str):
    """The HeadModel with fake parameters (shapes and dtypes, no storage), as the step's
    `placeholder_model`: its weights are read from the checkpoint only when the file is written."""
    import torch

    from mixtral_export.head_model import HeadModel
    from mixtral_export.model import TORCH_DTYPES

    with torch.device("meta"):
        model = HeadModel(config, head, routing).to(TORCH_DTYPES[config.dtype]).eval()
    return fake_parameters(model)


def export_head_graph(model, shapes: HeadShapes, path: Path, opset: int,
                      weights: Callable[..., "torch.Tensor"] | None = None,
                      progress: Callable[[str], None] | None = None):
    """torch.export the HeadModel at its static (B, T) and save it with all weights in one external file.

    `model` holds real weights (weights None) or placeholders (`placeholder_head_model`), each then
    read by weights(parameter name, shape) when the file is written (graphs/onnx_export.py's `trace`).
    """
    import torch

    ids = torch.zeros(shapes.batch, shapes.seq_len, dtype=torch.int64)  # (B, T)
    mask = torch.ones(shapes.batch, shapes.seq_len, dtype=torch.int64)  # (B, T)
    route_through_moe_nodes(model.body)  # gather: one com.microsoft.MoE node per block
    graph = trace(model, (ids, mask), None, list(HEAD_INPUT_NAMES), list(shapes.output_names), opset, weights)
    lay_out_experts(graph)  # gather: w13/w2 in com.microsoft.MoE's sliced layout; dense: none
    return save_graph(graph, path, progress)


def check_head_graph(path: Path, shapes: HeadShapes) -> None:
    """The step export's ONNX checks, then the head contract's names, element types and static dims."""
    import onnx

    proto = check_onnx_file(path)
    contract = shapes.io()
    for side, values in (("inputs", proto.graph.input), ("outputs", proto.graph.output)):
        names = [v.name for v in values]
        if names != [e["name"] for e in contract[side]]:
            raise ExportError(f"{path}: graph {side} are {names}, the contract says "
                              f"{[e['name'] for e in contract[side]]}")
        for value, want in zip(values, contract[side]):
            tensor = value.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
            if tensor.elem_type != DTYPES[want["dtype"]].onnx or dims != want["shape"]:
                raise ExportError(f"{path}: {value.name} is {onnx.TensorProto.DataType.Name(tensor.elem_type)} "
                                  f"{dims}, the contract says {want['dtype']} {want['shape']}")
