"""Trace with placeholder weights, then say exactly which parameter each ONNX initializer is.

The exporter is run on a model whose parameters are fake tensors (torch's FakeTensorMode: shapes
and dtypes, no storage), so the graph's initializers start out as shapes without data. Before the exporter's optimizer runs, each
parameter's initializer gets a stand-in:

- small parameters (at most FOLDABLE elements, the most the optimizer computes with: it folds,
  deduplicates and compares those) are read from the checkpoint for real, whatever it does to
  them is then exact, and they cost nothing;
- every other parameter gets a *tracer*: a numpy array of the right shape and dtype over a tiny
  buffer, axis i having stride (i + 1) elements. The optimizer may only move a large tensor
  (ONNX `Transpose` is the one op it folds whatever the size), and a moved tracer is a view of the
  same buffer whose strides spell out the permutation.

After optimizing, `resolve` maps every initializer to a `WeightRecipe` (which parameter, which axis
permutation) and swaps in a lazy tensor that reads that one parameter from the checkpoint only when
the weights file is written (graphs/weights_file.py). An initializer that is neither a parameter,
a permutation of one, a constant computed from small parameters, nor a constant computed from no
parameter at all fails the export, naming it: nothing the optimizer did goes unaccounted for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

FOLDABLE = 8192  # elements: onnxscript's DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT
FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"  # onnxscript's provenance metadata key
PIECE_BYTES = 256 << 20  # a StreamedTensor's largest read
RECIPE = "weight_recipe"  # Value.meta key (in memory only) where `resolve` leaves each recipe


class PlaceholderError(RuntimeError):
    """An initializer the placeholder trace cannot account for; one line naming it."""


@dataclass(frozen=True)
class WeightRecipe:
    """An initializer is parameter `param` with its axes permuted by `perm` (identity when sorted)."""

    param: str
    perm: tuple[int, ...]

    def __str__(self) -> str:
        return self.param if self.perm == tuple(sorted(self.perm)) else f"{self.param}.permute{self.perm}"


def tracer(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A read-only array of `shape` whose axis i has stride i + 1 elements, over a tiny buffer."""
    item = np.dtype(dtype).itemsize
    buffer = np.zeros(1 + sum((d - 1) * (i + 1) for i, d in enumerate(shape)), dtype=dtype)
    return np.lib.stride_tricks.as_strided(buffer, shape, [(i + 1) * item for i in range(len(shape))],
                                           writeable=False)


def plant(model, params: dict[str, tuple[int, ...]], read: Callable[[str], "torch.Tensor"]) -> dict[int, str]:
    """Give every parameter initializer of `model` (an onnx_ir model) its stand-in.

    params: parameter name -> shape; read(name) -> the parameter's real values (small ones only).
    Returns the tracers' buffer addresses -> parameter name, for `resolve`.
    """
    import onnx_ir as ir

    tracers = {}
    for value in model.graph.initializers.values():
        if value.name not in params:
            continue
        shape = tuple(params[value.name])
        if tuple(value.const_value.shape) != shape:
            raise PlaceholderError(f"initializer {value.name} has shape {list(value.const_value.shape)}, "
                                   f"the parameter {list(shape)}")
        if value.const_value.size <= FOLDABLE:
            value.const_value = ir.tensor_adapters.TorchTensor(read(value.name), name=value.name)
            continue
        array = tracer(shape, value.const_value.dtype.numpy())
        tracers[array.__array_interface__["data"][0]] = value.name
        value.const_value = ir.Tensor(array, dtype=value.const_value.dtype, name=value.name)
    return tracers


def resolve(model, tracers: dict[int, str], params: dict[str, tuple[int, ...]],
            read: Callable[[str], "torch.Tensor"],
            span: Callable[[str, int, int], "torch.Tensor"] | None = None,
            stored: Callable[[str, int, int], list | None] | None = None) -> dict[str, WeightRecipe]:
    """Map every initializer built from a traced parameter to its recipe and make it lazy.

    span(name, first, last, out=None), when given, reads elements [first, last) of a parameter's
    flat order (1-D; into `out`, a uint8 tensor of their bytes, when given), so a parameter written
    as stored goes to the file a block at a time (`streamed_tensor`);
    stored(name, first, last), when given, says where those elements lie in the checkpoint's files
    when they lie there as the graph needs them (or None), so they can be copied file to file.

    Returns initializer name -> recipe for each initializer that will be read from the checkpoint
    at write time. Raises PlaceholderError on any initializer that depends on a traced parameter
    in a way other than a plain permutation.
    """
    import onnx_ir as ir

    recipes = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        raw = getattr(tensor, "raw", None)
        if isinstance(raw, np.ndarray) and (param := traced_param(raw, tracers)) is not None:
            recipe = WeightRecipe(param, permutation(raw, params[param], value.name))
            recipes[value.name] = value.meta[RECIPE] = recipe
            if recipe.perm == tuple(sorted(recipe.perm)) and span is not None:  # as stored: read in row blocks
                value.const_value = streamed_tensor(
                    lambda first, last, out=None, p=param: span(p, first, last, out=out), dtype=tensor.dtype,
                    shape=ir.Shape(raw.shape), name=value.name,
                    stored=None if stored is None else (lambda first, last, p=param: stored(p, first, last)))
            else:
                value.const_value = ir.LazyTensor(
                    lambda r=recipe: ir.tensor_adapters.TorchTensor(read(r.param).permute(r.perm).contiguous()),
                    dtype=tensor.dtype, shape=ir.Shape(raw.shape), name=value.name)
            continue
        traced_sources = sorted(set(value.meta.get(FOLDED_FROM, ())) & set(tracers.values()))
        if traced_sources:
            raise PlaceholderError(f"initializer {value.name} is computed from {', '.join(traced_sources)} by "
                                   f"more than a transpose; the placeholder trace cannot write it")
        if is_fake(raw):
            raise PlaceholderError(f"initializer {value.name} has no data (a placeholder no parameter fills)")
    return recipes


def is_fake(tensor) -> bool:
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor) or (isinstance(tensor, torch.Tensor) and tensor.device.type == "meta")


def traced_param(array: np.ndarray, tracers: dict[int, str]) -> str | None:
    """The parameter whose tracer buffer `array` points into, or None when it points into none."""
    return tracers.get(array.__array_interface__["data"][0])


def permutation(array: np.ndarray, shape: tuple[int, ...], name: str) -> tuple[int, ...]:
    """The axis permutation that turns the tracer of `shape` into `array`, read from its strides."""
    item = array.itemsize
    perm = tuple(stride // item - 1 for stride in array.strides)
    if (any(stride % item for stride in array.strides) or sorted(perm) != list(range(len(shape)))
            or tuple(shape[axis] for axis in perm) != array.shape):
        raise PlaceholderError(f"initializer {name} {list(array.shape)} is not a permutation of its "
                               f"parameter {list(shape)}; the placeholder trace cannot write it")
    return perm


def streamed_tensor(read_span: Callable[..., "torch.Tensor"], dtype, shape, name: str,
                    stored: Callable[[int, int], list | None] | None = None):
    """An initializer read from the checkpoint a block of rows at a time when the file is written.

    A stacked expert parameter (Mixtral 8x7B's w13 is 1.9 GB in bf16) then never sits in memory
    whole: its `pieces()` yields at most PIECE_BYTES (or one row) at a time, `chunks(limit)` fills a
    writer's buffers a run of elements at a time (graphs/weights_file.py), and `span(first, last)`
    reads any run of its flat elements (graphs/onnx_moe.py lays out expert slices from those). It
    is an onnx_ir LazyTensor, so anything that asks for the values themselves (numpy(), tobytes())
    gets the whole tensor, read then. `stored_ranges()` gives the checkpoint byte ranges that hold
    it as it is (`stored`), or None; `stored_span(first, last)` those of a run of its elements.
    """
    import math

    import onnx_ir as ir

    dims = tuple(int(d) for d in shape)
    row = math.prod(dims[1:])

    class StreamedTensor(ir.LazyTensor):
        __slots__ = ()

        def span(self, first: int, last: int, out=None):
            return read_span(first, last, out=out)  # (last - first,), into out's bytes when given

        def chunks(self, limit: int):
            """(nbytes, fill(dest)) per run of at most `limit` bytes (one element at least), in order;
            fill reads the run into dest, a uint8 tensor of nbytes."""
            item = int(self.dtype.itemsize)
            total = math.prod(dims)
            step = max(1, limit // item)
            for first in range(0, total, step):
                last = min(total, first + step)
                yield (last - first) * item, lambda dest, a=first, b=last: read_span(a, b, out=dest)

        def stored_ranges(self):
            return stored(0, math.prod(dims)) if stored is not None else None

        def stored_span(self, first: int, last: int):
            """The checkpoint byte ranges (TensorEntry, in order) holding elements [first, last) as
            the graph does, or None (graphs/onnx_moe.py writes expert slices from those)."""
            return stored(first, last) if stored is not None else None

        def pieces(self):
            rows = self.shape[0]
            step = max(1, PIECE_BYTES // max(1, self.nbytes // max(rows, 1)))
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                yield read_span(start * row, stop * row).view(stop - start, *dims[1:])  # (rows, ...)

    return StreamedTensor(lambda: ir.tensor_adapters.TorchTensor(read_span(0, dims[0] * row).view(dims)),
                          dtype=dtype, shape=shape, name=name)
