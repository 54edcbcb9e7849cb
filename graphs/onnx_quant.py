"""Weight-only int8/int4 on the traced step graph: MoE -> com.microsoft.QMoE, weight MatMuls -> MatMulNBits.

A rewrite of the onnx_ir model between tracing and saving (graphs/onnx_export.py):

  MoE(x, router, fc1, -, fc2)   ->  QMoE(x, router, fc1 codes, fc1 scales, -, fc2 codes, fc2 scales,
                                         -, -, -, -[, fc1 zero points, fc2 zero points])
                                    expert_weight_bits, block_size, weights_prepacked=0 (raw layout)
  MatMul(h, W (K, N))           ->  MatMulNBits(h, codes (N, K/b, b*bits/8), scales[, zero points])
                                    for q/k/v/o of every layer and lm_head
  both with accuracy_level=4: inputs rounded to int8 per block (see WeightScheme)

Padding rows skip the experts. QMoE's optional router_weights input (14) carries the weights it
mixes the chosen experts with (router_probs then only picks them): softmax(router logits) times
1 for a real token, 0 for a padding one (position -1, graphs/contract.py). The kernel renormalises
them over the top k and routes a token nowhere when their sum is 0, so a chunk costs expert
reads and GEMMs for its real tokens only (a 16-token prompt in a 128-token chunk costs the MoE
what a 16-token chunk does). A real token's weights are the same softmax over its top k as
without the input; what a padding row computes is not part of the contract.

The step contract (inputs, outputs, ring) is unchanged. Embeddings, router and norms stay float.
Every quantized initializer is an `ir.LazyTensor` that quantizes its float source when the file
is written (graphs/quantize.py, one weight at a time; a weight's codes, scales and zero points are
written one after another, so a one-entry cache quantizes each weight once) and records the
weight's error. A stacked expert weight streamed from the checkpoint (graphs/onnx_moe.py's
`pieces()`) is quantized one virtual expert at a time as it is read: only its codes are held
whole. Weights are named by the model's parameter (the exporter folds a Linear's transpose into
an anonymous initializer, so the MatMuls are matched to q/k/v/o/lm_head in graph order and
checked to be the parameter transposed: by the placeholder trace's recipe, or by value).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from mixtral_export.graphs.artifact_folder import ExportError
from mixtral_export.artifact.contract import FLOAT_WEIGHTS, INT8_ACTIVATIONS, QUANT_BLOCK_SIZES, WEIGHT_SCHEMES, WeightScheme
from mixtral_export.graphs.onnx_moe import MOE_DOMAIN
from mixtral_export.artifact.weight_codes import QuantizeError, Quantized
from mixtral_export.graphs.quantize import check_block, quantize_matrices

QMOE_OP, NBITS_OP = "QMoE", "MatMulNBits"


def weights_routing(weights: str, routing: str | None) -> str:
    """The routing a build uses when none is asked for: quantized weights are always gathered (QMoE
    quantizes the gathered experts), float ones dense. An explicit routing stays as asked."""
    return routing or ("gather" if weights in WEIGHT_SCHEMES else "dense")


def check_weights(weights: str, block_size: int, routing: str, config, out) -> WeightScheme | None:
    """The WeightScheme for --weights (None for float), or one line saying why not; before any
    weight is read or traced, so a block that does not divide the model fails in a second."""
    if weights == FLOAT_WEIGHTS:
        return None
    if weights not in WEIGHT_SCHEMES:
        raise ExportError(f"{out}: weights {weights!r} are not supported (one of {FLOAT_WEIGHTS}, {', '.join(WEIGHT_SCHEMES)})")
    if block_size not in QUANT_BLOCK_SIZES:
        raise ExportError(f"{out}: block size {block_size} is not supported (one of {', '.join(map(str, QUANT_BLOCK_SIZES))})")
    if routing != "gather" or config.dtype != "float32":
        raise ExportError(f"{out}: {weights} weights need --routing gather and float32 activations "
                          f"(com.microsoft.QMoE quantizes the gathered experts); got {routing}, {config.dtype}")
    # The input features K of every quantized weight: q/k/v, fc1, lm_head; fc2; o_proj.
    features = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
                "num_attention_heads x head_dim": config.num_attention_heads * config.head_dim}
    for name, k in features.items():
        if k % block_size:
            fits = [str(b) for b in QUANT_BLOCK_SIZES if all(n % b == 0 for n in features.values())]
            advice = f"pass --block-size {' or '.join(fits)}" if fits else "no --block-size divides them all"
            raise ExportError(f"{out}: the model's {name}: {k} input features do not split into blocks "
                              f"of {block_size}; {advice}")
    return WEIGHT_SCHEMES[weights]


def quantize_weights(model, torch_model, scheme: WeightScheme, block_size: int,
                     weights: Callable[..., object] | None = None) -> dict:
    """Rewrite `model` (onnx_ir) in place; returns the manifest's `quantization` record, whose
    per-tensor errors fill in as the file is saved. weights(name, shape), for a `torch_model` of
    placeholders (graphs/onnx_export.py), reads a parameter's values from the checkpoint."""
    if block_size not in QUANT_BLOCK_SIZES:
        raise QuantizeError(f"block size {block_size} is not one of {', '.join(map(str, QUANT_BLOCK_SIZES))}")
    record = {"scheme": scheme.name, "bits": scheme.bits, "symmetric": scheme.symmetric, "block_size": block_size,
              "activations": scheme.activations, "tensors": {}}
    cache = OneWeightCache(scheme, block_size, record["tensors"])
    graph = model.graph
    moe_nodes = [n for n in graph.all_nodes() if n.domain == MOE_DOMAIN and n.op_type == "MoE"]
    live = live_rows(graph, moe_nodes[0]) if moe_nodes else None  # (N, 1): 1 real token, 0 padding
    for node in moe_nodes:
        fc1, fc2 = node.inputs[2], node.inputs[4]
        parts = [*quantized_inputs(graph, fc1, fc1.name, "experts", cache),
                 *quantized_inputs(graph, fc2, fc2.name, "experts", cache)]  # w1, s1, [z1], w2, s2, [z2]
        inputs = [node.inputs[0], node.inputs[1], parts[0], parts[1], None]
        step = 2 if scheme.symmetric else 3
        inputs += [parts[step], parts[step + 1], None, None, None, None]
        inputs += [parts[2], parts[5]] if not scheme.symmetric else [None, None]
        inputs += [None, router_weights(graph, node, live)]  # 13: fc3 zero points, 14: router_weights
        attributes = {a.name: a.value for a in node.attributes.values()}
        replace(graph, node, QMOE_OP, inputs, dict(attributes, expert_weight_bits=scheme.bits,
                                                   block_size=block_size, weights_prepacked=0,
                                                   accuracy_level=INT8_ACTIVATIONS))
    named = linear_weights(torch_model)
    matmuls = [n for n in graph.all_nodes() if n.domain == "" and n.op_type == "MatMul"
               and n.inputs[1] is not None and n.inputs[1].const_value is not None
               and len(n.inputs[1].const_value.shape) == 2]
    if len(matmuls) != len(named):
        raise QuantizeError(f"found {len(matmuls)} weight MatMuls in the graph, expected {len(named)} "
                            f"(q/k/v/o per layer and lm_head)")
    for node, (name, param) in zip(matmuls, named):
        weight = node.inputs[1]
        k, n = weight.const_value.shape
        values = (lambda name=name, shape=tuple(param.shape): weights(name, shape)) if weights else param.detach
        if (n, k) != tuple(param.shape) or not is_transposed(weight, name, values):
            raise QuantizeError(f"{name}: the graph's MatMul weight {weight.name} is not this parameter transposed")
        codes = quantized_inputs(graph, weight, name, "lm_head" if name == "lm_head.weight" else "attention", cache,
                                 transpose=True)
        replace(graph, node, NBITS_OP, [node.inputs[0], *codes],
                dict(K=k, N=n, bits=scheme.bits, block_size=block_size, accuracy_level=INT8_ACTIVATIONS))
    return record


def live_rows(graph, before) -> object:
    """(N, 1) float32, N = B * T: 1.0 where the graph input `positions` holds a token, 0.0 for
    padding (NO_POSITION); the nodes go in before `before`."""
    import onnx_ir as ir

    positions = next((v for v in graph.inputs if v.name == "positions"), None)
    if positions is None:
        raise QuantizeError("the step graph has no `positions` input to tell real tokens from padding")
    first = ir.Value(name="live_rows.first_position", const_value=ir.tensor(np.array(0, np.int64)))
    flat = ir.Value(name="live_rows.shape", const_value=ir.tensor(np.array([-1, 1], np.int64)))
    for value in (first, flat):
        graph.register_initializer(value)
    real = ir.node("GreaterOrEqual", [positions, first])  # (B, T) bool
    as_float = ir.node("Cast", [real.outputs[0]], attributes={"to": ir.DataType.FLOAT})  # (B, T)
    rows = ir.node("Reshape", [as_float.outputs[0], flat])  # (B * T, 1)
    rows.outputs[0].name = "live_rows"
    graph.insert_before(before, [real, as_float, rows])
    return rows.outputs[0]


def router_weights(graph, node, live) -> object:
    """QMoE's router_weights for `node`: softmax of its router logits (N, E'), zeroed on padding rows."""
    import onnx_ir as ir

    softmax = ir.node("Softmax", [node.inputs[1]], attributes={"axis": -1})  # (N, E')
    masked = ir.node("Mul", [softmax.outputs[0], live])  # (N, E')
    masked.outputs[0].name = f"{node.name}.router_weights"
    graph.insert_before(node, [softmax, masked])
    return masked.outputs[0]


def is_transposed(weight, name: str, values: Callable[[], object]) -> bool:
    """Whether the initializer `weight` is parameter `name` transposed: said by its placeholder
    recipe (graphs/placeholder_weights.py) without reading it, else compared with values()."""
    from mixtral_export.graphs.placeholder_weights import RECIPE, WeightRecipe

    if RECIPE in weight.meta:
        return weight.meta[RECIPE] == WeightRecipe(name, (1, 0))
    return np.array_equal(weight.const_value.numpy().T, np.asarray(values()))


def linear_weights(torch_model) -> list[tuple[str, object]]:
    """(parameter name, weight (N, K)) of every Linear a scheme quantizes, in graph order."""
    out = []
    for i, layer in torch_model.blocks():
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append((f"layers.{i}.self_attn.{proj}.weight", getattr(layer.self_attn, proj).weight))
    head = getattr(torch_model, "lm_head", None)  # a pipeline stage before the last has none
    return out + ([("lm_head.weight", head.weight)] if head is not None else [])


class OneWeightCache:
    """The last weight's quantization, so its codes, scales and zero points quantize it once."""

    def __init__(self, scheme: WeightScheme, block_size: int, errors: dict):
        self.scheme, self.block_size, self.errors = scheme, block_size, errors
        self.kinds: dict[str, str] = {}
        self.key, self.value = None, None

    def get(self, name: str, source: Callable[[], np.ndarray], shape: tuple[int, ...]) -> Quantized:
        """source() gives the weight (..., N, K) whole, or its (N, K) matrices in order."""
        if self.key != name:
            self.key, self.value = None, None  # drop the last one before making the next
            weight = source()
            matrices = weight if not isinstance(weight, np.ndarray) else (
                weight[index] for index in np.ndindex(*weight.shape[:-2]))
            q, stats = quantize_matrices(matrices, shape, self.scheme, self.block_size, name)
            self.errors[name] = {"kind": self.kinds[name], **stats}
            self.key, self.value = name, q
        return self.value


def quantized_inputs(graph, value, name: str, kind: str, cache: OneWeightCache, transpose: bool = False) -> list:
    """New lazy initializers (codes, scales[, zero points]) for the float initializer `value`."""
    import onnx_ir as ir

    if value is None or value.const_value is None or len(value.uses()) != 1:
        raise QuantizeError(f"{name}: expected an initializer used by one node")
    tensor = value.const_value
    shape = list(tensor.shape)
    if transpose:
        shape = shape[::-1]  # MatMul's W (K, N) -> the kernel's (N, K)
    *lead, k = shape
    check_block(k, cache.block_size, name)
    cache.kinds[name] = kind
    bits, block, blocks = cache.scheme.bits, cache.block_size, k // cache.block_size
    if transpose:
        source = lambda: np.ascontiguousarray(tensor.numpy().T)  # noqa: E731
    elif hasattr(tensor, "pieces"):  # streamed: one virtual expert at a time, read now
        source = lambda: (np.asarray(piece) for piece in tensor.pieces())  # noqa: E731
    else:
        source = tensor.numpy
    packed_shape = [*lead, blocks, block * bits // 8] if transpose else [*lead, k * bits // 8]  # QMoE: (E, N, K*bits/8)
    parts = [("codes", "packed", ir.DataType.UINT8, packed_shape),
             ("scales", "scales", ir.DataType.FLOAT, [*lead, blocks])]
    if not cache.scheme.symmetric:
        parts.append(("zero_points", "zero_points", ir.DataType.UINT8, [*lead, -(-blocks * bits // 8)]))
    out = []
    for suffix, field, dtype, part_shape in parts:
        def make(field=field, part_shape=part_shape):
            return ir.Tensor(np.ascontiguousarray(getattr(cache.get(name, source, tuple(shape)), field).reshape(part_shape)))

        lazy = ir.LazyTensor(make, dtype=dtype, shape=ir.Shape(part_shape), name=f"{name}.{suffix}")
        new = ir.Value(name=f"{name}.{suffix}", shape=ir.Shape(part_shape), type=ir.TensorType(dtype),
                       const_value=lazy)
        graph.register_initializer(new)
        out.append(new)
    return out


def replace(graph, node, op_type: str, inputs: list, attributes: dict) -> None:
    """Put a com.microsoft `op_type` node where `node` was, with its output's name, and drop the
    float initializers it no longer uses."""
    import onnx_ir as ir
    from onnx_ir.convenience import convert_attributes, replace_nodes_and_values

    old_inputs = [v for v in node.inputs if v is not None and v.const_value is not None]
    new = ir.Node(MOE_DOMAIN, op_type, inputs, attributes=convert_attributes(attributes),
                  num_outputs=1, name=f"{node.name}_{op_type}")
    new.outputs[0].shape, new.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
    replace_nodes_and_values(graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]])
    for value in old_inputs:
        if not value.uses() and value.name in graph.initializers and value not in graph.inputs:
            graph.initializers.pop(value.name)
