"""The gathered MoE on ONNX: one `com.microsoft.MoE` node per block, reading only the chosen experts.

A plain ONNX Gather of expert weights materialises a copy (read k experts, write them, read them
again: ~3x the minimal traffic). ONNX Runtime's contrib op `com.microsoft.MoE` (CPU and CUDA)
instead runs each token through its top-k experts straight from the stacked weights:

    MoE(input (N, H), router_probs (N, E'), fc1 (E', 2I', H), "", fc2 (E', H, I'))
        k=k', activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1

With normalize_routing_weights=1 it takes router *logits*, softmaxes them, keeps the top k and
renormalises: Mixtral's routing. swiglu_fusion=1 means fc1's rows are interleaved (gate_0, up_0,
gate_1, up_1, ...) and the activation is silu(gate) * up; the CPU kernel refuses the
concatenated layout (swiglu_fusion=2) and a separate fc3, so silu is the only activation it can
express.

Expert slices. ONNX Runtime 1.32's CPU kernel parallelises over experts only: with T threads,
thread t runs the t-th contiguous range of experts, each expert's GEMMs on one thread. A decode
token's top-2 of 8 experts land in the same half 3 times in 7, and then one core streams both
experts while the other idles: decode steps scattered between ~45 and ~90 ms on the
mixtral-shaped layer. So each expert is cut into P slices of its intermediate dimension (P a
power of two, `expert_parts`) and the node sees E' = P * E virtual
experts: virtual expert p * E + e is slice p of expert e (fc1 rows of that slice's gate and up
units, fc2 columns of the same units), I' = I / P, k' = P * k, and the router logits repeated P
times. The top k' of the repeated logits are exactly the P copies of each of the top k experts,
thread t's range holds whole slices of every expert, and each chosen expert's work is split
evenly over any thread count dividing P. SwiGLU is per unit and fc2 sums over units, so the
slices' outputs add up to the expert's; the softmax over P copies gives each slice weight
w / P, which the graph multiplies back by P (a power of two: exact). One caveat: router
probabilities tied exactly at the k-th place may mix slices of the tied experts (the reference
breaks such ties by index; ties need equal router logits).

Quantized experts stay whole (QUANTIZED_EXPERT_PARTS). The CPU `QMoE` kernel (int8/int4,
graphs/onnx_quant.py) deals experts to its threads itself, round-robin, largest first, so a
decode token's 2 experts already land one per thread at 2 threads, and fewer, longer GEMVs read
faster (int4 at 2 threads: docs/quantization.md).

How it gets into the graph: before tracing, `route_through_moe_nodes` makes each gathered MoE
block (mixtral_export/model.py, which knows nothing of ONNX) call `moe_node`, a
`torch.onnx.ops.symbolic` op that the exporter writes as this node, with the model's own w13/w2
parameters as fc1/fc2. `lay_out_experts` then swaps each for a lazy tensor
that yields the sliced, interleaved layout when the file is saved, reading the parameter from the
checkpoint only then (graphs/placeholder_weights.py): as byte ranges of the checkpoint when it
holds the experts in the graph's dtype (`expert_pieces`), else one virtual expert at a time (w2:
one layer's w2 at a time, see `expert_slices`); the graph has no reshuffling ops for ONNX Runtime
to fold at load.
(A torch custom op with an onnxscript translation would work too, but still needs this weight
pass and adds an op registry.)
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple

from mixtral_export.errors import UserError

if TYPE_CHECKING:
    import torch

MOE_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops
GATHER_ACTIVATIONS = ("silu", "swish")  # what swiglu_fusion=1 computes: silu(gate) * up
MAX_EXPERT_PARTS = 8  # slices per float expert, a power of two (see the module docstring)
QUANTIZED_EXPERT_PARTS = 1  # QMoE's experts: whole (see the module docstring)


class OnnxMoeError(UserError, ValueError):
    """A model the com.microsoft.MoE node cannot express; one line."""


def check_gather_supported(hidden_act: str, where: str) -> None:
    if hidden_act not in GATHER_ACTIVATIONS:
        raise OnnxMoeError(f"{where}: routing 'gather' on ONNX needs a silu MoE (com.microsoft.MoE computes "
                           f"silu(gate) * up); this model's hidden_act is {hidden_act!r}; use routing 'dense'")


def expert_parts(intermediate: int, block: int = 1) -> int:
    """The most slices, up to MAX_EXPERT_PARTS (QUANTIZED_EXPERT_PARTS for quantized weights, block > 1),
    that split the intermediate dimension evenly (into whole quantization blocks of `block` units:
    fc2's blocks run along I)."""
    parts = MAX_EXPERT_PARTS if block == 1 else QUANTIZED_EXPERT_PARTS
    while parts > 1 and intermediate % (parts * block):
        parts //= 2
    return parts


def route_through_moe_nodes(model, block: int = 1) -> int:
    """Make every gathered MoE block of a MixtralStatic (or a stage of one) trace as `moe_node`; returns how many.

    For exporting only: the model's own forward stays as it is for every other use. `block`:
    the quantization block the expert slices must hold whole (1: float weights).
    """
    count = 0
    for _, layer in model.blocks():
        if layer.moe.routing == "gather":
            layer.moe.forward = functools.partial(moe_node, layer.moe, block=block)
            count += 1
    return count


def moe_node(moe, x: torch.Tensor, block: int = 1) -> torch.Tensor:
    """(B, T, H) -> (B, T, H) through one com.microsoft.MoE node over `moe`'s parameters.

    Each expert runs as `parts` slices of its intermediate dimension; the router logits are
    repeated once per slice, the node's softmax over the repeats gives each slice 1/parts of its
    expert's weight, and the exact power-of-two product below restores it.
    """
    import torch

    b, t, h = x.shape
    x = x.reshape(b * t, h)  # (N, H)
    parts = expert_parts(moe.intermediate, block)
    logits = moe.gate(x).repeat(1, parts)  # (N, parts * E): slice p of expert e is virtual expert p * E + e
    out = torch.onnx.ops.symbolic(
        f"{MOE_DOMAIN}::MoE", (x, logits, moe.w13, None, moe.w2),
        dict(k=moe.top_k * parts, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1),
        dtype=x.dtype, shape=x.shape, version=1)  # (N, H)
    return (out * parts if parts > 1 else out).reshape(b, t, h)


def lay_out_experts(model) -> int:
    """Rewrite every MoE node's fc1/fc2 initializers (an onnx_ir model's) from the model's
    w13 (E, 2I, H) / w2 (E, H, I) into the node's sliced layout; returns the node count."""
    import onnx_ir as ir

    count = 0
    for node in model.graph.all_nodes():
        if node.domain != MOE_DOMAIN or node.op_type != "MoE":
            continue
        k = node.attributes["k"].value
        fc1, fc2, router = node.inputs[2], node.inputs[4], node.inputs[1]
        for value in (fc1, fc2):
            if value is None or value.const_value is None or len(value.uses()) != 1:
                raise OnnxMoeError(f"{node.name}: fc1/fc2 must be initializers used by this MoE node alone")
        experts = fc1.const_value.shape[0]
        parts = router.shape[-1] // experts
        if parts < 1 or parts * experts != router.shape[-1] or k % parts:
            raise OnnxMoeError(f"{node.name}: router width {router.shape[-1]} and k={k} do not slice "
                               f"{experts} experts evenly")
        for value, lay_out in ((fc1, fc1_slices), (fc2, fc2_slices)):
            e, rows, cols = value.const_value.shape
            shape = ir.Shape([e * parts, rows // parts, cols] if value is fc1 else [e * parts, rows, cols // parts])
            value.const_value = sliced_tensor(value.const_value, lay_out, parts, shape)
            value.shape = shape
        count += 1
    return count


def sliced_tensor(source, lay_out, parts: int, shape):
    """`source` (w13 or w2) in the node's sliced layout, computed only when the file is written.

    A source streamed from the checkpoint (graphs/placeholder_weights.py, it has `span`) comes
    back in `pieces()`, one virtual expert at a time (`expert_slices`), so a layer's stacked
    experts are never copied whole; any other source is laid out whole, when asked for.
    """
    import onnx_ir as ir

    class SlicedExperts(ir.LazyTensor):
        __slots__ = ()

        if hasattr(source, "span"):
            def pieces(self):
                return expert_slices(source, lay_out, parts)

            def chunks(self, limit: int):
                return expert_chunks(source, lay_out, parts, limit)

            def stored_pieces(self, limit: int):
                return expert_pieces(source, lay_out, parts, limit)

    return SlicedExperts(lambda: ir.tensor_adapters.TorchTensor(lay_out(torch_view(source), parts)),
                         dtype=source.dtype, shape=shape, name=source.name)


def expert_slices(source, lay_out, parts: int):
    """Virtual experts p * E + e in order, each read from `source` (a StreamedTensor of w13 or w2).

    fc1: virtual expert (p, e) is two runs of w13[e]'s rows (gate units, up units of slice p),
    read as they are and interleaved: nothing but that slice in memory. fc2: a slice is columns of
    w2[e], strided in the file; reading w2[e] once per slice would read the layer P times, so w2 is
    read once, whole (half of w13's size), and sliced from memory.
    """
    import torch

    e, rows, cols = (int(d) for d in source.shape)
    if lay_out is fc1_slices:
        inter, units = rows // 2, rows // 2 // parts
        for p in range(parts):
            for x in range(e):
                gate, up = (source.span((x * rows + first) * cols, (x * rows + first + units) * cols).view(units, cols)
                            for first in (p * units, inter + p * units))  # (I/P, H) each
                yield torch.stack((gate, up), dim=1).view(2 * units, cols)  # (I/P, 2, H) -> (2I/P, H) interleaved
        return
    w2 = source.span(0, e * rows * cols).view(e, rows, cols)  # (E, H, I)
    units = cols // parts
    for p in range(parts):
        for x in range(e):
            yield w2[x, :, p * units:(p + 1) * units].contiguous()  # (H, I/P)


def expert_chunks(source, lay_out, parts: int, limit: int):
    """The layout of `expert_slices` as (nbytes, fill(dest)) runs of at most `limit` bytes (one
    row at least), for a writer that fills its own reused buffers (graphs/weights_file.py): nothing
    is allocated per slice and no bytes are copied but into dest.

    fc1: a run of gate/up row pairs of virtual expert (p, e): the gate rows and the up rows are
    read as they lie in w13 into one reused scratch buffer, then interleaved into dest by one
    strided copy. fc2: rows of a column slice of w2[e], copied from the layer's w2, read whole
    once as `expert_slices` does.
    """
    import torch

    e, rows, cols = (int(d) for d in source.shape)
    item = int(source.dtype.itemsize)
    if lay_out is fc1_slices:
        inter, units = rows // 2, rows // 2 // parts
        step = max(1, limit // (2 * cols * item))  # row pairs per run
        scratch = torch.empty(min(step, units) * cols * item, dtype=torch.uint8)  # one run's gate (or up) rows
        for p in range(parts):
            for x in range(e):
                for first in range(0, units, step):
                    pairs = min(step, units - first)
                    gate, up = ((x * rows + start + first) * cols for start in (p * units, inter + p * units))
                    yield 2 * pairs * cols * item, functools.partial(interleave_rows, source, gate, up, pairs, cols,
                                                                     scratch=scratch)
        return
    w2 = source.span(0, e * rows * cols).view(e, rows, cols)  # (E, H, I)
    units = cols // parts
    step = max(1, limit // (units * item))  # rows of a slice per run
    for p in range(parts):
        for x in range(e):
            for first in range(0, rows, step):
                block = w2[x, first:first + step, p * units:(p + 1) * units]  # (rows, I/P), strided
                yield block.numel() * item, lambda dest, block=block: dest.view(block.dtype).view(block.shape).copy_(block)


def expert_pieces(source, lay_out, parts: int, limit: int):
    """The layout of `expert_chunks` as checkpoint byte ranges, when the checkpoint holds `source`
    as the graph does (same dtype) with each expert's gate, up and w2 rows in one tensor (else
    None): per run of at most `limit` bytes (one row at least), a list of `Rows` whose rows
    interleave (row 0 of each, then row 1 of each...). fc1: the gate rows and the up rows of a
    slice of w13[e]; fc2: the rows of a column slice of w2[e]. A writer hands these to the kernel
    as they lie (graphs/weights_file.py `write_pieces`: pwritev from a memory map): no read into
    Python, no layout copy, no layer's w2 in memory.
    """
    if not hasattr(source, "stored_span") or source.stored_ranges() is None:
        return None
    e, rows, cols = (int(d) for d in source.shape)
    halves = 2 if lay_out is fc1_slices else 1  # fc1: w13's gate rows, then its up rows
    blocks = [located(source, (x * rows + half * rows // halves) * cols, rows // halves * cols)
              for x in range(e) for half in range(halves)]  # (path, byte start) of [gate, up] or w2, per expert
    if None in blocks:
        return None
    return _expert_pieces(source, lay_out, parts, limit, blocks)


class Rows(NamedTuple):
    """`count` runs of `nbytes` bytes of the file at `path`, `stride` bytes apart from `start`."""

    path: str
    start: int
    nbytes: int
    stride: int
    count: int


def located(source, first: int, count: int) -> tuple[str, int] | None:
    """(path, byte start) of elements [first, first + count) of `source` when one checkpoint
    tensor holds them as they are, else None."""
    entries = source.stored_span(first, first + count)
    return (str(entries[0].path), entries[0].start) if len(entries) == 1 else None


def _expert_pieces(source, lay_out, parts: int, limit: int, blocks: list[tuple[str, int]]):
    e, rows, cols = (int(d) for d in source.shape)
    item = int(source.dtype.itemsize)
    if lay_out is fc1_slices:
        units, row = rows // 2 // parts, cols * item
        step = max(1, limit // (2 * row))  # row pairs per run
        for p in range(parts):
            for x in range(e):
                for first in range(0, units, step):
                    pairs = min(step, units - first)
                    yield [Rows(path, start + (p * units + first) * row, row, row, pairs)  # gate rows, up rows
                           for path, start in blocks[2 * x:2 * x + 2]]
        return
    units = cols // parts
    step = max(1, limit // (units * item))  # rows of a slice per run
    for p in range(parts):
        for x in range(e):
            path, start = blocks[x]
            for first in range(0, rows, step):
                yield [Rows(path, start + (first * cols + p * units) * item, units * item, cols * item,
                            min(step, rows - first))]


def interleave_rows(source, gate: int, up: int, pairs: int, cols: int, dest: torch.Tensor, *,
                    scratch: torch.Tensor) -> None:
    """dest (uint8) <- `pairs` gate rows from flat element `gate` of `source` interleaved with as
    many up rows from element `up`: gate_0, up_0, gate_1, up_1, ... (swiglu_fusion=1). `scratch`
    (uint8, at least half of dest) is the caller's, reused run after run: no page faults per run."""
    scratch = scratch[:dest.numel() // 2]
    for n, start in enumerate((gate, up)):
        rows = source.span(start, start + pairs * cols, out=scratch).view(pairs, cols)  # (pairs, H)
        dest.view(rows.dtype).view(pairs, 2, cols)[:, n].copy_(rows)


def torch_view(tensor) -> torch.Tensor:
    import onnx_ir as ir
    import torch

    while isinstance(tensor, ir.LazyTensor):  # a weight read from the checkpoint only now
        tensor = tensor.raw()
    return tensor.raw if isinstance(getattr(tensor, "raw", None), torch.Tensor) else torch.from_numpy(tensor.numpy())


def fc1_slices(w13: torch.Tensor, parts: int) -> torch.Tensor:
    """(E, 2I, H) rows [gate; up] -> (P*E, 2I/P, H): virtual expert p*E+e holds gate/up units
    [p*I/P, (p+1)*I/P) of expert e, interleaved gate_0, up_0, gate_1, up_1, ... (swiglu_fusion=1)."""
    e, rows, h = w13.shape
    units = rows // 2 // parts
    w = w13.reshape(e, 2, parts, units, h)  # (E, gate|up, P, I/P, H)
    return w.permute(2, 0, 3, 1, 4).reshape(parts * e, 2 * units, h)  # (P, E, I/P, 2, H) -> (P*E, 2I/P, H)


def fc2_slices(w2: torch.Tensor, parts: int) -> torch.Tensor:
    """(E, H, I) -> (P*E, H, I/P): virtual expert p*E+e holds columns [p*I/P, (p+1)*I/P) of expert e."""
    e, h, inter = w2.shape
    w = w2.reshape(e, h, parts, inter // parts)  # (E, H, P, I/P)
    return w.permute(2, 0, 1, 3).reshape(parts * e, h, inter // parts)  # (P, E, H, I/P) -> (P*E, H, I/P)
