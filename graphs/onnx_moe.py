"""The gathered MoE on ONNX: one `com.microsoft.MoE` node per block, reading only the chosen experts.

A plain ONNX Gather of expert weights materialises a copy (read k experts, write them, read them
again: ~3x the minimal traffic). ONNX Runtime's contrib op `com.microsoft.MoE` (CPU and CUDA)
instead runs each token through its top-k experts straight from the stacked weights:

    MoE(input (N, H), router_probs (N, E), fc1 (E, 2I, H), "", fc2 (E, H, I))
        k=top_k, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1

With normalize_routing_weights=1 it takes router *logits*, softmaxes them, keeps the top k and
renormalises: Mixtral's routing. swiglu_fusion=1 means fc1's rows are interleaved (gate_0, up_0,
gate_1, up_1, ...) and the activation is silu(gate) * up; the CPU kernel refuses the
concatenated layout (swiglu_fusion=2) and a separate fc3, so silu is the only activation it can
express.

How it gets into the graph: under `torch.onnx.export`, `MoE.forward` (mixtral_export/model.py)
calls `MoE.onnx_node`, a `torch.onnx.ops.symbolic` op that the exporter writes as this node, with the
model's own w13 parameter as fc1. The exported program's fc1 initializers still hold w13's
[w1; w3] row order, so `interleave_fc1` then swaps each for a lazy tensor that yields the
interleaved rows when the file is saved: one layer's copy at a time, nothing kept in memory, and
the graph has no reshuffling ops for ONNX Runtime to fold at load. (A torch custom op with an
onnxscript translation would work too, but still needs this weight pass and adds an op registry.)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from mixtral_export.model import MOE_DOMAIN

if TYPE_CHECKING:
    import torch

GATHER_ACTIVATIONS = ("silu", "swish")  # what swiglu_fusion=1 computes: silu(gate) * up


class OnnxMoeError(ValueError):
    """A model the com.microsoft.MoE node cannot express; one line."""


def check_gather_supported(hidden_act: str, where: str) -> None:
    if hidden_act not in GATHER_ACTIVATIONS:
        raise OnnxMoeError(f"{where}: routing 'gather' on ONNX needs a silu MoE (com.microsoft.MoE computes "
                           f"silu(gate) * up); this model's hidden_act is {hidden_act!r}; use routing 'dense'")


def interleave_fc1(model) -> int:
    """Rewrite every MoE node's fc1 initializer (an onnx_ir model's) into interleaved rows; returns the count."""
    import onnx_ir as ir

    count = 0
    for node in model.graph.all_nodes():
        if node.domain != MOE_DOMAIN or node.op_type != "MoE":
            continue
        fc1 = node.inputs[2]
        if fc1 is None or fc1.const_value is None or len(fc1.uses()) != 1:
            raise OnnxMoeError(f"{node.name}: fc1 must be an initializer used by this MoE node alone")
        fc1.const_value = ir.LazyTensor(lambda w=fc1.const_value: ir.tensor_adapters.TorchTensor(interleaved(w)),
                                        dtype=fc1.const_value.dtype, shape=fc1.const_value.shape, name=fc1.name)
        count += 1
    return count


def interleaved(tensor) -> torch.Tensor:
    """(E, 2I, H) rows [gate; up] -> rows gate_0, up_0, gate_1, up_1, ...: fc1's swiglu_fusion=1 layout."""
    import torch

    w = tensor.raw if isinstance(getattr(tensor, "raw", None), torch.Tensor) else torch.from_numpy(tensor.numpy())
    e, rows, h = w.shape
    return w.view(e, 2, rows // 2, h).transpose(1, 2).reshape(e, rows, h)  # (E, I, 2, H) -> (E, 2I, H)
