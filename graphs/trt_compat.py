"""Will TensorRT 10's ONNX parser take this graph? A static check that needs only `onnx`.

Runs anywhere, without TensorRT or a GPU, on the graph file alone (external data is never
loaded, so it takes a second on a 90 GB model). It checks what the parser is documented to
refuse, so a graph is known to need export fixes before anyone books a GPU to build it:

  - operators: every node is an ai.onnx operator in TensorRT's support list (below); other
    domains (com.microsoft contrib ops, ai.onnx.ml) have no importer and would need a plugin;
  - restrictions of those operators the list documents (TopK's K a build-time constant,
    reduction axes constant, no ScatterND reduction, ...);
  - data types: every tensor is a type TensorRT has (no string, complex, float64, uint16...),
    and each operator's data input is one of the types its importer takes;
  - shapes: the graph's inputs and outputs are static but for the declared chunk axis (and the
    cache span axis S, which the engine's profiles fix per span bucket), and every symbolic dimension
    inside is an expression of those axes.

The operator table is transcribed from onnx-tensorrt's docs/operators.md for TensorRT 10.15
(the newest 10.x list); the few operators added during 10.x are also flagged with the version
they need, so the check holds for every TensorRT 10. It is conservative where TensorRT is
lenient: an input that must be "a build-time constant" must be an initializer or a Constant
node here, although TensorRT also folds some computed shapes. A clean report means the parser
should accept the graph; only TensorRT itself (graphs/trt_engine.py) proves it.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto as TP

from mixtral_export.artifact.contract import CHUNK_AXIS, SPAN_AXIS
from mixtral_export.errors import UserError

DEFAULT_DOMAINS = ("", "ai.onnx")
OPSETS = (9, 20)  # what every TensorRT 10 parses (10.0: 9-20; 10.15 reads up to 24)
TOPK_MAX_K = 3840

F16 = frozenset({TP.FLOAT, TP.FLOAT16})
FLOAT = F16 | {TP.BFLOAT16}
NUMERIC = FLOAT | {TP.INT32, TP.INT64}
ANY = NUMERIC | {TP.BOOL}
BOOL = frozenset({TP.BOOL})


def _ops(types: frozenset[int] | None, names: str) -> dict[str, frozenset[int] | None]:
    return dict.fromkeys(names.split(), types)


# op -> the element types its importer takes for the data input (None: not type-checked here).
SUPPORTED_OPS: dict[str, frozenset[int] | None] = {
    **_ops(FLOAT, "Acos Acosh Asin Asinh Atan Atanh Attention AveragePool BatchNormalization Ceil Celu Clip "
                  "Conv ConvTranspose Cos Cosh CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool "
                  "GlobalLpPool GlobalMaxPool GroupNormalization GRU HardSigmoid HardSwish Hardmax ImageScaler "
                  "InstanceNormalization IsInf LayerNormalization LeakyRelu Log LogSoftmax LRN LSTM "
                  "LpNormalization LpPool MatMul MaxPool MeanVarianceNormalization ParametricSoftplus PRelu "
                  "QuantizeLinear RandomNormalLike RandomUniformLike Reciprocal Resize RMSNormalization RNN "
                  "RotaryEmbedding Round ScaledTanh Selu Sigmoid Sin Sinh Softmax Softplus Softsign Sqrt Tan "
                  "Tanh ThresholdedRelu Upsample"),
    **_ops(NUMERIC, "Abs Add ArgMax ArgMin DepthToSpace Div Equal Gelu Greater GreaterOrEqual IsNaN Less "
                    "LessOrEqual Max Mean Min Mod Mul Neg Pad Pow Range ReduceL1 ReduceL2 ReduceLogSum "
                    "ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu "
                    "Scatter ScatterElements ScatterND Shrink Sign SpaceToDepth Sub Sum TopK"),
    **_ops(ANY, "Concat Expand EyeLike Flatten Gather GatherElements GatherND Identity ReverseSequence "
                "Reshape Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where"),
    **_ops(ANY | {TP.UINT8}, "Cast CastLike"),
    **_ops(BOOL, "And Not Or Xor"),
    **_ops(F16, "DeformConv GridSample Mish NonMaxSuppression NonZero RoiAlign"),
    **_ops(frozenset({TP.FLOAT}), "STFT"),
    **_ops(FLOAT | {TP.INT32}, "TensorScatter"),
    **_ops(None, "BlackmanWindow Constant ConstantOfShape DequantizeLinear HammingWindow HannWindow If Loop "
                 "OneHot RandomNormal RandomUniform Scan"),
}
# Operators only later TensorRT 10 releases parse (onnx-tensorrt changelog).
SINCE = {"Attention": "10.14", "RMSNormalization": "10.15", "RotaryEmbedding": "10.15", "TensorScatter": "10.15"}
DATA_INPUT = {"Where": 1}  # the input the type column describes, where it is not the first
REDUCE_OPS = tuple(op for op in SUPPORTED_OPS if op.startswith("Reduce"))
# Inputs the parser needs as build-time constants: op -> (input index, ONNX input name).
CONSTANT_INPUTS = {"TopK": (1, "K"), "CumSum": (1, "axis"), "OneHot": (1, "depth"), "Squeeze": (1, "axes"),
                   "Unsqueeze": (1, "axes"), **{op: (1, "axes") for op in REDUCE_OPS}}
SINGLE_OUTPUT = ("LayerNormalization", "MaxPool")  # the parser imports only their first output
# Element types TensorRT has; INT8/INT4/FP8/FP4 only as quantized weights, UINT8 only at the I/O.
TRT_TYPES = frozenset({TP.FLOAT, TP.FLOAT16, TP.BFLOAT16, TP.INT32, TP.INT64, TP.INT8, TP.UINT8, TP.BOOL,
                       TP.FLOAT8E4M3FN, TP.INT4, TP.FLOAT4E2M1})
FOLD = "fold constants at export (the exporter's optimize=True, or polygraphy surgeon sanitize --fold-constants)"


class TrtCompatError(UserError, ValueError):
    """A graph this check cannot read; one line naming the file."""


@dataclass(frozen=True)
class Finding:
    """One thing TensorRT's parser would refuse: where (node or tensor), what, and the fix."""

    node: str
    op_type: str
    problem: str


@dataclass(frozen=True)
class CompatReport:
    path: Path
    opset: int | None
    nodes: int
    op_counts: dict[str, int]
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        return not self.findings

    def lines(self) -> list[str]:
        head = (f"{self.path}: {self.nodes} nodes, {len(self.op_counts)} operator types, opset {self.opset}: "
                + ("TensorRT 10's ONNX parser should accept it" if self.ok
                   else f"{len(self.findings)} problem(s) for TensorRT 10's ONNX parser"))
        return [head, *(f"  {f.node} ({f.op_type}): {f.problem}" for f in self.findings)]


def check_trt_compat(path: str | Path, chunk_axis: str = CHUNK_AXIS) -> CompatReport:
    """Check an ONNX graph (a .onnx file, or an artifact folder's step graph) against TensorRT 10."""
    path = graph_file(Path(path))
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, DecodeError) as err:
        raise TrtCompatError(f"{path}: not a readable ONNX graph ({err})") from None
    findings: list[Finding] = []
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as err:
        findings.append(Finding(path.name, "model", f"ONNX shape inference failed ({str(err).splitlines()[0]}); "
                                                    f"types and shapes below are only those the file declares"))
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), None)
    if opset is not None and not OPSETS[0] <= opset <= OPSETS[1]:
        low, high = OPSETS
        findings.append(Finding(path.name, "model", f"opset {opset} is outside {low}-{high}, the range every "
                                                    f"TensorRT 10 parses: export with opset {high} or lower"))
    functions = {(f.domain, f.name): f for f in model.functions}
    nodes = list(all_nodes(model.graph.node, functions))
    types = tensor_types(model.graph)
    constants = constant_tensors(model.graph, nodes)
    producers = {out: node for node in nodes for out in node.output}
    for index, node in enumerate(nodes):
        findings += check_node(node, node.name or f"#{index}", types, constants)
    findings += check_types(model.graph, types, producers)
    findings += check_io_shapes(model.graph, chunk_axis)
    findings += check_inner_shapes(model.graph, chunk_axis, producers)
    findings += check_external_data(model.graph, path)
    counts = Counter(node.op_type for node in nodes)
    return CompatReport(path=path, opset=opset, nodes=len(nodes), op_counts=dict(sorted(counts.items())),
                        findings=tuple(findings))


def graph_file(path: Path) -> Path:
    """The .onnx file itself, or the step graph an artifact folder's manifest names."""
    if path.is_dir():
        from mixtral_export.artifact.manifest import load_manifest

        return load_manifest(path, verify_files=False).graph_path("step")
    if not path.is_file():
        raise TrtCompatError(f"{path}: no such ONNX graph or artifact folder")
    return path


def all_nodes(nodes: Iterable[onnx.NodeProto], functions: dict) -> Iterator[onnx.NodeProto]:
    """Every node TensorRT imports: subgraphs (If/Loop/Scan) and model-local function bodies included."""
    for node in nodes:
        called = functions.get((node.domain, node.op_type))
        if called is not None:  # the parser imports a local function by importing its body
            yield from all_nodes(called.node, functions)
            continue
        yield node
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs):
                yield from all_nodes(sub.node, functions)


def tensor_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {init.name: init.data_type for init in graph.initializer}
    for value in (*graph.input, *graph.value_info, *graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types


def constant_tensors(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> dict[str, onnx.TensorProto | None]:
    """Tensors known at build time: initializers and Constant outputs (their tensor, where it is one)."""
    found: dict[str, onnx.TensorProto | None] = {init.name: init for init in graph.initializer}
    for node in nodes:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            found[node.output[0]] = next((a.t for a in node.attribute if a.name == "value"), None)
    return found


def check_node(node: onnx.NodeProto, name: str, types: dict[str, int],
               constants: dict[str, onnx.TensorProto | None]) -> list[Finding]:
    op = node.op_type

    def finding(problem: str) -> list[Finding]:
        return [Finding(name, op, problem)]

    if node.domain not in DEFAULT_DOMAINS:
        return finding(f"operator of domain {node.domain!r}: TensorRT's parser imports only ai.onnx operators "
                       f"(this would need a TensorRT plugin named {op}); export without contrib/custom ops")
    if op not in SUPPORTED_OPS:
        return finding("not supported by TensorRT 10's ONNX parser; replace it at export")
    out: list[Finding] = []
    if op in SINCE:
        out += finding(f"parsed only by TensorRT >= {SINCE[op]}; older TensorRT 10 releases reject it")
    allowed, data = SUPPORTED_OPS[op], DATA_INPUT.get(op, 0)
    elem = types.get(node.input[data]) if len(node.input) > data else None
    if allowed is not None and elem in TRT_TYPES and elem not in allowed:  # other types: see check_types
        out += finding(f"input {node.input[data]!r} is {type_name(elem)}, which TensorRT's "
                       f"{op} does not take ({', '.join(sorted(type_name(t) for t in allowed))}); cast at export")
    if op in CONSTANT_INPUTS:
        index, what = CONSTANT_INPUTS[op]
        if len(node.input) > index and node.input[index] and node.input[index] not in constants:
            out += finding(f"`{what}` ({node.input[index]!r}) is computed at run time; TensorRT needs it as a "
                           f"build-time constant: {FOLD}")
    out += [Finding(name, op, problem) for problem in attribute_problems(node, constants)]
    if op in SINGLE_OUTPUT and len([o for o in node.output if o]) > 1:
        out += finding("only the first output is supported by TensorRT; drop the others at export")
    return out


def attribute_problems(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto | None]) -> list[str]:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    reduction = attrs.get("reduction", b"none")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    if node.op_type == "TopK":
        problems = [] if attrs.get("sorted", 1) == 1 else ["`sorted` must be 1 for TensorRT"]
        k = constants.get(node.input[1]) if len(node.input) > 1 else None
        if k is not None and k.data_location != TP.EXTERNAL:  # (1,) int64, stored in the graph file
            value = int(onnx.numpy_helper.to_array(k).reshape(-1)[0])
            if value >= TOPK_MAX_K:
                problems.append(f"K = {value}; TensorRT's TopK takes K < {TOPK_MAX_K}")
        return problems
    if node.op_type == "ScatterND" and reduction != "none":
        return [f"reduction {reduction!r} is not supported by TensorRT (only 'none')"]
    if node.op_type == "ScatterElements" and reduction != "none":
        return [f"reduction {reduction!r} needs TensorRT's ScatterElements plugin (libnvinfer_plugin), which "
                f"build_engine does not load; use reduction 'none'"]
    if node.op_type == "Constant":
        unsupported = ("sparse_value", "value_string", "value_strings")
        return [f"Constant `{a}` is not supported by TensorRT" for a in unsupported if a in attrs]
    return []


def check_types(graph: onnx.GraphProto, types: dict[str, int], producers: dict) -> list[Finding]:
    """Every typed tensor is a TensorRT type; uint8 only at the graph's inputs and outputs."""
    io = {v.name for v in (*graph.input, *graph.output)}
    initializers = {init.name for init in graph.initializer}
    out = []
    for name, elem in types.items():
        if elem in TRT_TYPES and (elem != TP.UINT8 or name in io):
            continue
        where = located(name, producers, "initializer" if name in initializers else "graph input")
        if elem == TP.DOUBLE:
            why = "TensorRT casts DOUBLE down to FLOAT (clamping); export float32"
        elif elem == TP.UINT8:
            why = "TensorRT takes uint8 only as a graph input or output; cast at export"
        else:
            why = "TensorRT has no such type; remove or cast it at export"
        out.append(Finding(*where, f"tensor {name!r} is {type_name(elem)}: {why}"))
    return out


def check_io_shapes(graph: onnx.GraphProto, chunk_axis: str) -> list[Finding]:
    """Graph inputs and outputs: every dim static except the chunk axis the profiles set."""
    out = []
    for side, values in (("graph input", graph.input), ("graph output", graph.output)):
        for value in values:
            if not value.type.tensor_type.HasField("shape"):
                out.append(Finding(value.name, side, "has no shape; TensorRT needs its rank and static dims"))
                continue
            for axis, dim in enumerate(value.type.tensor_type.shape.dim):
                if dim.HasField("dim_value") or dim.dim_param in (chunk_axis, SPAN_AXIS):
                    continue
                what = f"symbol {dim.dim_param!r}" if dim.dim_param else "unknown"
                out.append(Finding(value.name, side, f"dim {axis} is {what}: only the chunk axis {chunk_axis!r} may be "
                                                     f"dynamic (export the other dims static)"))
    return out


def check_inner_shapes(graph: onnx.GraphProto, chunk_axis: str, producers: dict) -> list[Finding]:
    """Inner symbolic dims must be expressions of the chunk axis (e.g. '2*T', 'T + 32')."""
    out = []
    for value in graph.value_info:
        stray = sorted({symbol for dim in value.type.tensor_type.shape.dim
                        for symbol in re.findall(r"[A-Za-z_][A-Za-z_0-9]*", dim.dim_param)
                        if symbol not in (chunk_axis, SPAN_AXIS)})
        if stray:
            out.append(Finding(*located(value.name, producers, "value"),
                               f"tensor {value.name!r} has dims in {', '.join(stray)}, not derived from the chunk "
                               f"axis {chunk_axis!r}: a dim the export left dynamic"))
    return out


def check_external_data(graph: onnx.GraphProto, path: Path) -> list[Finding]:
    """The parser reads external weights relative to the graph file: they must be there."""
    locations = {entry.value for init in graph.initializer if init.data_location == TP.EXTERNAL
                 for entry in init.external_data if entry.key == "location"}
    return [Finding(location, "external data", f"not found next to {path.name}; TensorRT's parser reads "
                                               f"external weights from the graph's folder")
            for location in sorted(locations) if not (path.parent / location).is_file()]


def located(tensor: str, producers: dict, otherwise: str) -> tuple[str, str]:
    """(node, op_type) of the node producing `tensor`, or (tensor, `otherwise`) for a graph input/initializer."""
    node = producers.get(tensor)
    return (node.name or tensor, node.op_type) if node is not None else (tensor, otherwise)


def type_name(elem: int) -> str:
    return TP.DataType.Name(elem).lower()
