"""A checkpoint folder -> an ONNX step-graph artifact: model.onnx + model.onnx.data + manifest.json.

One graph, one weights file. The graph's only free axis is the chunk length T: the runtime feeds
it T = each prefill chunk for prefill and T = 1 for decode; batch, cache slots and every model
dimension are static. Two graphs (prefill and decode) would either store the weights twice on
disk or, sharing one data file, still be two ORT sessions that each load their own copy of the
weights into memory: 2 x 90 GB for Mixtral 8x7B. One session over one graph loads them once.
The weights always go to external data, which is also what lets a > 2 GB model exist at all
(a protobuf caps at 2 GB).

Exporter: `torch.onnx.export(dynamo=True)` (torch.export + onnxscript) with `dynamic_shapes`
marking T. On torch 2.13 it takes ~5 s for the tiny model, keeps every axis but T static (checked
below), folds the Linear weight transposes into the stored weights and writes bf16 initializers.
The legacy exporter (`dynamo=False`, `dynamic_axes`)
is faster (~0.5 s) but deprecated, emits 2.5x the nodes and loses static dims (new_k's head_dim
comes out as a symbol), so it is not used. Node metadata (FX names, stack traces with the build
machine's paths) is dropped: it was 85% of model.onnx.

Weights never pass through the tracer: the step is traced once on a model whose parameters are fake
tensors (shapes without storage), and model.onnx.data is written tensor by tensor straight from the safetensors
files (graphs/placeholder_weights.py says which parameter, transposed or not, each initializer is;
graphs/weights_file.py writes and hashes them one at a time). Peak memory is the tracer's plus
about one tensor, whatever the number of layers; the artifact is byte for byte the one a trace
with the real weights writes (tests/test_placeholder_export.py).

Weights: "float" (the default) stores them in the build's dtype; "int8" / "int4" quantizes the
experts, attention projections and lm_head block-wise (graphs/onnx_quant.py, gathered routing and
float32 only), each weight (each virtual expert of a stacked one) as it streams from the
checkpoint; the manifest's `quantization` records the scheme and each tensor's error.

Routing: "dense" (the default) runs every expert on every token as plain ONNX ops; "gather" makes
each MoE block one `com.microsoft.MoE` node that reads only each token's top-k experts (ONNX
Runtime contrib op, silu models only; see graphs/onnx_moe.py). The manifest records which.

The build is atomic: everything is written into a hidden temp folder beside `out_dir`, the
manifest last, then the folder is renamed into place. Any failure (or Ctrl-C) removes the temp
folder, so `out_dir` either holds a complete, hashed artifact or is untouched.
"""
from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Callable

from mixtral_export.artifact.contract import (CHUNK_AXIS, DEFAULT_QUANT_BLOCK, DTYPES, FLOAT_DTYPES, FLOAT_WEIGHTS, NO_POSITION,
                             SPAN_AXIS, StageShapes, StepShapes, default_block_size)
from mixtral_export.graphs.artifact_folder import ExportError, building, finish
from mixtral_export.artifact.manifest import FileEntry, io_contract
from mixtral_export.graphs.onnx_moe import OnnxMoeError, check_gather_supported, lay_out_experts, route_through_moe_nodes
from mixtral_export.graphs.onnx_quant import check_weights, quantize_weights, weights_routing
from mixtral_export.artifact.config import MixtralConfig

GRAPH_NAME = "model.onnx"
DATA_NAME = GRAPH_NAME + ".data"  # the name torch's exporter gives the external data


def export_onnx(checkpoint_folder: str | Path, out_dir: str | Path, dtype: str | None = "float32", batch: int = 1,
                prefill_chunk: int | tuple[int, ...] = 16, cache_slots: int | None = None, slide: bool = False,
                opset: int = 18,
                progress: Callable[[str], None] | None = None, routing: str | None = None,
                weights: str = FLOAT_WEIGHTS, block_size: int | None = None, kv_dtype: str | None = None,
                stages: int | None = None, stage_layers: tuple[int, ...] | None = None) -> Path:
    """Export the checkpoint's step graph for these static shapes into `out_dir`; returns out_dir.

    dtype None means the checkpoint's own; the graph's logits are float32 whatever the dtype.
    routing "dense" | "gather" picks how the MoE blocks compute (see the module docstring; None: gather
    for int8/int4 weights, which are always gathered, else dense);
    weights "float" | "int8" | "int4" with block_size 32 | 64 | 128 (None: the scheme's default) how its
    weights are stored; kv_dtype (None: the build's dtype) | "float16" | "int8" how its KV cache is
    (artifact/contract.py); stages N (or stage_layers, the layer count of each) splits the step into
    pipeline stages, one folder each (graphs/onnx_stages.py), whose caches keep the build's dtype.
    """
    checkpoint, out = Path(checkpoint_folder), Path(out_dir)
    say = progress or (lambda stage: None)
    routing = weights_routing(weights, routing)
    config = export_config(checkpoint, out, dtype, routing)
    dtype = config.dtype
    block_size = block_size or default_block_size(weights)
    scheme = check_weights(weights, block_size, routing, config, out)
    shapes = StepShapes.for_config(config, batch=batch, prefill_chunk=prefill_chunk, cache_slots=cache_slots,
                                   dtype=dtype, slide=slide, span_axis=True, kv_dtype=kv_dtype)
    split = None
    if stages is not None or stage_layers is not None:
        from mixtral_export.graphs.onnx_stages import split_layers

        if shapes.kv_dtype is not None:
            raise ExportError(f"{out}: pipeline stages keep the cache in the build's dtype ({shapes.dtype}), "
                              f"not kv_dtype {shapes.kv_dtype}")
        split = split_layers(config, out, stages, stage_layers, scheme, block_size)
    with building(out) as tmp:
        from mixtral_export.checkpoint import ParameterReader

        reader = ParameterReader(checkpoint, config)  # headers only: every tensor checked, none read
        if split is not None:
            from mixtral_export.graphs.onnx_stages import write_stages

            def write(folder: Path, stage: StageShapes):
                data, record = write_step(folder, out, reader, config, stage, routing, opset, scheme, block_size, say)
                return ({DATA_NAME: data} if data is not None else None), record

            write_stages(tmp, checkpoint, config, shapes, split, routing, opset, GRAPH_NAME, write, say,
                         quantized=scheme is not None)
        else:
            data, quantization = write_step(tmp, out, reader, config, shapes, routing, opset, scheme, block_size, say)
            say("writing the manifest")
            finish(tmp, checkpoint, config, kind="onnx", shapes=shapes, graphs={"step": GRAPH_NAME}, opset=opset,
                   routing=routing, hashed={DATA_NAME: data} if data is not None else None,
                   quantization=quantization)
    say(f"wrote {out}")
    return out


def write_step(folder: Path, out: Path, reader, config: MixtralConfig, contract: StepShapes | StageShapes,
               routing: str, opset: int, scheme, block_size: int,
               say: Callable[[str], None]) -> tuple[FileEntry | None, dict | None]:
    """Trace the step (or one stage of it) on placeholder weights, write GRAPH_NAME and DATA_NAME into
    `folder` from the checkpoint `reader`, and check the graph; returns the data file's entry and
    the quantization record. Errors name `out`, where the user will look, not the temp folder."""
    step = getattr(contract, "step", contract)
    layers = (contract.first_layer, contract.stop_layer) if isinstance(contract, StageShapes) else None
    model = placeholder_model(config, step, routing, layers, embed=getattr(contract, "embeds_ids", True))
    what = f"stage {contract.index} (layers {layers[0]}..{layers[1] - 1})" if layers else GRAPH_NAME
    say(f"exporting {what} (opset {opset}, B={step.batch}, T={'|'.join(map(str, step.chunks))}, "
        f"S={step.cache_slots}, {routing} MoE, {step.dtype}) with placeholder weights")
    temp = folder.parent if layers else folder
    try:
        data, quantization = export_graph(model, contract, folder / GRAPH_NAME, opset, weights=reader.read,
                                          progress=say, scheme=scheme, block_size=block_size)
        say("checking the graph")
        check_graph(folder / GRAPH_NAME, contract)
    except ExportError as error:  # name the artifact's files where the user will look for them
        raise ExportError(str(error).replace(str(temp), str(out))) from None
    return data, quantization


def export_config(checkpoint: Path, out: Path, dtype: str | None, routing: str) -> MixtralConfig:
    """The checkpoint's config as the build's dtype (None: its own), with dtype and routing checked;
    shared by the step graph and the head graphs (graphs/onnx_heads.py)."""
    config = MixtralConfig.from_json(checkpoint / "config.json")
    dtype = dtype or config.dtype
    if dtype not in FLOAT_DTYPES:
        raise ExportError(f"{out}: dtype {dtype!r} is not supported (one of {', '.join(FLOAT_DTYPES)})")
    from mixtral_export.model import ROUTINGS

    if routing not in ROUTINGS:
        raise ExportError(f"{out}: routing {routing!r} is not supported (one of {', '.join(ROUTINGS)})")
    if routing == "gather":
        try:
            check_gather_supported(config.hidden_act, str(out))
        except OnnxMoeError as error:
            raise ExportError(str(error)) from None
    return config.replace(dtype=dtype)


def placeholder_model(config: MixtralConfig, shapes: StepShapes, routing: str, layers: tuple[int, int] | None = None,
                      embed: bool = True):
    """The step model with fake parameters (torch's FakeTensorMode): shapes and dtypes, no storage.

    Fake rather than meta: they claim the CPU as their device, so the real example inputs and
    the CPU tensors an op's tracing stand-in makes (torch.onnx.ops.symbolic's) mix with them.
    """
    import torch

    from mixtral_export.model import TORCH_DTYPES, MixtralStatic

    with torch.device("meta"):
        model = MixtralStatic(config, shapes.attention_window, routing, layers=layers, embed=embed,
                              kv_dtype=shapes.kv_dtype).to(TORCH_DTYPES[shapes.dtype]).eval()
    return fake_parameters(model)


def fake_parameters(model):
    """`model` (built on the meta device) with every parameter a fake CPU tensor; returns it.
    Shared with the head graphs (graphs/onnx_heads.py)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    fakes = {}  # id(meta parameter) -> its fake: a tied weight stays one parameter
    with FakeTensorMode(allow_non_fake_inputs=True):
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if id(param) not in fakes:
                    fakes[id(param)] = torch.nn.Parameter(torch.empty_like(param, device="cpu"), requires_grad=False)
                setattr(module, name, fakes[id(param)])
    return model


def export_graph(model, shapes: StepShapes | StageShapes, path: Path, opset: int,
                 weights: Callable[..., "torch.Tensor"] | None = None,
                 progress: Callable[[str], None] | None = None, scheme=None,
                 block_size: int = DEFAULT_QUANT_BLOCK) -> tuple[FileEntry | None, dict | None]:
    """torch.export the step with T symbolic and save it with all weights in one external file.

    `model` holds real weights (weights None) or placeholders (`placeholder_model`), each then
    read by weights(parameter name, shape) when the file is written. With `scheme` (a
    contract.WeightScheme) the weights are quantized as they are written. Returns the data file's
    size and hash (None when the graph has no external weights) and the quantization record
    (None for float weights).
    """
    graph = step_graph(model, shapes, opset, weights, block=block_size if scheme else 1)
    quantization = quantize_weights(graph, model, scheme, block_size, weights) if scheme else None
    return save_graph(graph, path, progress), quantization  # quantizes one weight at a time, filling the errors


def step_graph(model, contract: StepShapes | StageShapes, opset: int,
               weights: Callable[..., "torch.Tensor"] | None = None, block: int = 1):
    """The step (or one pipeline stage of it) traced with T symbolic, as an onnx_ir model ready to
    save (see `export_graph`); `block`: the quantization block each gathered expert slice must hold
    whole (1: float weights)."""
    import torch

    from mixtral_export.model import TORCH_DTYPES

    shapes = getattr(contract, "step", contract)
    example = max(shapes.prefill_chunk, 2)  # torch.export specialises a size-1 example to 1
    # A span-axis graph traces at a span unlike T's example, so the exporter never ties the two symbols.
    span = shapes.cache_slots if not shapes.span_axis or shapes.cache_slots != example else shapes.cache_slots + 1
    dtype = getattr(torch, shapes.cache_dtype)  # the cache's element type
    first = (torch.zeros(shapes.batch, example, dtype=torch.int64) if contract.input_names[0] == "input_ids"
             else torch.zeros(shapes.batch, example, contract.hidden_size,
                              dtype=TORCH_DTYPES[shapes.dtype]))  # ids (B, T) | hidden (B, T, H)
    args = (first,
            torch.arange(example, dtype=torch.int64).repeat(shapes.batch, 1),  # positions (B, T)
            list(torch.zeros(contract.cache_shape(span), dtype=dtype)),  # cache_k: L x (B, Hkv, S, D), one input each
            list(torch.zeros(contract.cache_shape(span), dtype=dtype)),  # cache_v: L x (B, Hkv, S, D)
            torch.full((shapes.batch, span), NO_POSITION, dtype=torch.int64))  # (B, S)
    if shapes.scaled_cache:  # an int8 cache's scales: L x (B, Hkv, S) per side
        args += (list(torch.ones(shapes.cache_shape(span)[:-1])), list(torch.ones(shapes.cache_shape(span)[:-1])))
    route_through_moe_nodes(model, block)  # gather: one com.microsoft.MoE node per block
    if shapes.scaled_cache:  # an int8 cache's products as ONNX MatMulInteger nodes (model.py: code_scores, code_mix)
        for _, layer in model.blocks():
            layer.self_attn.integer_matmul = matmul_integer_node
    chunk = torch.export.Dim(CHUNK_AXIS, min=1)
    graph_layers = contract.cache_shape()[0]  # the whole model's layers, or this stage's
    if shapes.span_axis:
        slots = torch.export.Dim(SPAN_AXIS, min=2, max=max(shapes.cache_slots, span))
        layers, cache_positions = [{2: slots}] * graph_layers, {1: slots}
    else:
        layers, cache_positions = [None] * graph_layers, None
    dynamic = {"input_ids": {1: chunk}, "positions": {1: chunk}, "cache_k": layers, "cache_v": layers,
               "cache_positions": cache_positions}
    if shapes.scaled_cache:
        dynamic.update(cache_k_scale=layers, cache_v_scale=layers)
    graph = trace(model, args, dynamic, list(contract.input_names), list(contract.output_names), opset, weights)
    name_free_axes(graph, shapes.span_axis)
    lay_out_experts(graph)  # gather: w13/w2 in com.microsoft.MoE's sliced layout; dense: none
    return graph


def trace(model, args: tuple, dynamic: dict, input_names: list[str], output_names: list[str], opset: int,
          weights: Callable[..., "torch.Tensor"] | None = None):
    """Any module -> an optimized onnx_ir model, as `torch.onnx.export(dynamo=True, optimize=True)` makes it.

    With `weights`, the module's parameters are placeholders (fake tensors: `placeholder_model`) and
    every initializer made from a parameter ends up a lazy tensor that reads it with
    weights(name, shape) when saved, or a run of its flat elements with weights(name, shape, elements=(first, last))
    (into a writer's buffer with out=...; graphs/placeholder_weights.py).
    """
    import torch

    from mixtral_export.graphs.placeholder_weights import PlaceholderError, plant, resolve

    params = {name: tuple(p.shape) for name, p in model.state_dict(keep_vars=True).items()}
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # it warns per missing torchvision op and chats per stage
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if weights is None:
                program = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=dynamic, input_names=input_names,
                                            output_names=output_names, opset_version=opset, optimize=True,
                                            verbose=False)
            else:  # optimize=True's steps, in its order, with the placeholders planted before optimizing
                from torch.onnx._internal.exporter import _ir_passes

                program = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=dynamic, opset_version=opset,
                                            optimize=False, verbose=False)
                read = lambda name: weights(name, params[name])  # noqa: E731
                tracers = plant(program.model, params, read)
                program.optimize()
                _ir_passes.rename_inputs(program.model, input_names)
                _ir_passes.rename_outputs(program.model, output_names)
                resolve(program.model, tracers, params, read,
                        span=lambda name, first, last, out=None: weights(name, params[name], elements=(first, last),
                                                                         out=out),
                        stored=lambda name, first, last: weights(name, params[name], elements=(first, last),
                                                                 stored=True))
    except PlaceholderError as error:
        raise ExportError(str(error)) from None
    finally:
        exporter_log.setLevel(level)
    for node in program.model.graph.all_nodes():  # FX names and stack traces with build paths
        node.metadata_props.clear()
    return program.model


def save_graph(graph, path: Path, progress: Callable[[str], None] | None = None) -> FileEntry | None:
    """Write the graph to `path` and its weights to DATA_NAME beside it, one tensor at a time."""
    from mixtral_export.graphs.weights_file import save_with_weights

    return save_with_weights(graph, path, DATA_NAME, progress)


def matmul_integer_node(a, b):
    """a @ b of int8 / uint8 codes as one ONNX MatMulInteger node (int32 sums; ONNX Runtime's CPU
    kernel reads the codes as bytes): what model.integer_matmul computes in torch."""
    import torch

    shape = (*a.shape[:-1], b.shape[-1])  # (..., M, N)
    return torch.onnx.ops.symbolic("::MatMulInteger", (a, b), {}, dtype=torch.int32, shape=shape, version=10)


def name_free_axes(model, span_axis: bool) -> None:
    """Call the exporter's symbols for T "T" and for the span "S" everywhere (it cannot name them
    itself when the cache inputs are lists of tensors)."""
    import onnx_ir as ir

    inputs = model.graph.inputs
    names = {str(inputs[0].shape[1].value): CHUNK_AXIS}  # input_ids (B, T)
    if span_axis:
        names[str(inputs[2].shape[2].value)] = SPAN_AXIS  # cache_k.0 (B, Hkv, S, D)
    symbol = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")

    def renamed(dim):
        if isinstance(dim, ir.SymbolicDim) and dim.value is not None and symbol.search(dim.value):
            return ir.SymbolicDim(symbol.sub(lambda m: names[m.group(1)], dim.value))  # "s18" -> "T", "2*s18" -> "2*T"
        return dim

    values = [*model.graph.inputs, *model.graph.outputs,
              *(out for node in model.graph.all_nodes() for out in node.outputs)]
    for value in values:
        if value.shape is not None:
            value.shape = ir.Shape([renamed(dim) for dim in value.shape])


def check_graph(path: Path, shapes: StepShapes | StageShapes) -> None:
    """ONNX checker, shape inference (both by path, for > 2 GB) and the contract's I/O on the result."""
    import onnx

    proto = check_onnx_file(path)
    symbolic = io_contract(shapes, (NO_POSITION,))  # chunk -1 marks the symbolic T axis
    for side, values in (("inputs", proto.graph.input), ("outputs", proto.graph.output)):
        expected = symbolic[side]
        names = [v.name for v in values]
        if names != [e["name"] for e in expected]:
            raise ExportError(f"{path}: graph {side} are {names}, the contract says {[e['name'] for e in expected]}")
        for value, want in zip(values, expected):
            tensor = value.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
            want_dims = [SPAN_AXIS if axis in shapes.span_dims(value.name) else CHUNK_AXIS if d == NO_POSITION else d
                         for axis, d in enumerate(want["shapes"][str(NO_POSITION)])]
            if tensor.elem_type != DTYPES[want["dtype"]].onnx or dims != want_dims:
                raise ExportError(f"{path}: {value.name} is {onnx.TensorProto.DataType.Name(tensor.elem_type)} "
                                  f"{dims}, the contract says {want['dtype']} {want_dims}")


def check_onnx_file(path: Path):
    """ONNX checker and shape inference (both by path, for > 2 GB), weights only in DATA_NAME; the proto.
    Shared by the step graph and the head graphs (graphs/onnx_heads.py)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
        onnx.shape_inference.infer_shapes_path(str(path))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"{path}: invalid ONNX graph ({first})") from None
    proto = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for init in proto.graph.initializer for entry in init.external_data
                 if entry.key == "location"}
    if locations - {DATA_NAME}:
        raise ExportError(f"{path}: weights in {sorted(locations)}, expected only {DATA_NAME}")
    return proto
