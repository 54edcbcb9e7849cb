"""The ONNX backend's KV ring in numpy, laid out so the slots in use are one contiguous prefix span.

A ring of S slots is held in flat buffers of L*B*Hkv*S*D elements per side (and B*S positions),
but viewed as (L, B, Hkv, s, D) for the current span s (artifact/contract.py: span axis): slots
[0, s) of every (layer, row, kv head) sit next to each other, so each layer's cache input is a
contiguous view ONNX Runtime binds without a copy, and a step reads s slots, not S. The span is the
smallest one (`StepShapes.tight_span`: a power of two up to 1024 slots, then a multiple of 256)
that holds every row's extent (its highest position + 1) after the step; when it changes the
buffers are re-laid out in place, block by block (a copy of the span, once per 256 slots at most:
amortised over the steps that filled them). New slots are empty
(keys/values 0, position -1), which the mask hides exactly, so every span computes what the whole
ring computes. Buffers come from np.zeros (calloc): pages past the spans in use are never touched.
An int8 cache (StepShapes.scaled_cache) keeps its codes so and a float32 scale per slot and kv head
beside them, (L, B, Hkv, s), laid out the same way.
"""
from __future__ import annotations

import numpy as np

from mixtral_export.artifact.contract import NO_POSITION, StepShapes, layer_caches
from mixtral_export.runtimes.step import ring_writes


class SpanRing:
    """Keys/values and the position each slot holds, viewed over the span in use."""

    def __init__(self, shapes: StepShapes, dtype: np.dtype, spans: bool = True, num_layers: int | None = None,
                 first_layer: int = 0):
        """spans=False: always the whole ring (what a graph without the span axis needs; the baseline);
        num_layers, first_layer: the layers this ring holds (a pipeline stage's), by default the model's."""
        self.shapes = shapes
        self.num_layers = num_layers or shapes.num_layers
        self.first_layer = first_layer
        self.spans = spans and shapes.span_axis
        size = int(np.prod(self.cache_shape()))
        self.flat_k = np.zeros(size, dtype=dtype)  # L*B*Hkv*S*D, viewed as (L, B, Hkv, s, D)
        self.flat_v = np.zeros(size, dtype=dtype)
        self.flat_positions = np.full(shapes.batch * shapes.cache_slots, NO_POSITION, dtype=np.int64)  # B*S
        scales = size // shapes.head_dim if shapes.scaled_cache else 0
        self.flat_scales = (np.zeros(scales, np.float32), np.zeros(scales, np.float32))  # L*B*Hkv*S each, k and v
        self.extent = np.zeros(shapes.batch, dtype=np.int64)  # (B,) each row's highest position + 1
        self.span = shapes.tight_span(0) if self.spans else shapes.cache_slots
        self.relayouts = 0  # how many times the span changed (a copy each)

    @property
    def cache_k(self) -> np.ndarray:
        return self.flat_k[:self.span_size].reshape(self.cache_shape(self.span))  # (L, B, Hkv, s, D)

    @property
    def cache_v(self) -> np.ndarray:
        return self.flat_v[:self.span_size].reshape(self.cache_shape(self.span))  # (L, B, Hkv, s, D)

    @property
    def cache_positions(self) -> np.ndarray:
        return self.flat_positions[:self.shapes.batch * self.span].reshape(self.shapes.batch, self.span)  # (B, s)

    @property
    def scales(self) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
        """An int8 cache's key and value scales (L, B, Hkv, s); (None, None) for a float cache."""
        if not self.shapes.scaled_cache:
            return None, None
        shape = self.cache_shape(self.span)[:-1]  # (L, B, Hkv, s)
        return tuple(flat[:self.span_size // self.shapes.head_dim].reshape(shape) for flat in self.flat_scales)

    def inputs(self) -> dict[str, np.ndarray]:
        """The graph's cache inputs as views of the current span: each layer's keys, values (scales), positions."""
        return {**layer_caches(self.cache_k, self.cache_v, *self.scales, first=self.first_layer),
                "cache_positions": self.cache_positions}

    @property
    def span_size(self) -> int:
        return int(np.prod(self.cache_shape(self.span)))

    def cache_shape(self, span: int | None = None) -> tuple[int, int, int, int, int]:
        return (self.num_layers, *self.shapes.cache_shape(span)[1:])  # (L, B, Hkv, s, D)

    def span_needed(self, positions: np.ndarray) -> int:
        """The span a step feeding `positions` (B, T) needs (`tight_span`): every row's extent after it fits."""
        if not self.spans:
            return self.shapes.cache_slots
        return self.shapes.tight_span(longest_extent(self.extent, positions))

    def fit(self, span: int) -> bool:
        """Re-lay the buffers out for `span` slots (every row's extent must fit it); True if it changed."""
        if span == self.span:
            return False
        head = self.num_layers * self.shapes.batch * self.shapes.num_kv_heads  # blocks of (s, D)
        relayout(self.flat_k, head, self.span, span, self.shapes.head_dim, 0)
        relayout(self.flat_v, head, self.span, span, self.shapes.head_dim, 0)
        relayout(self.flat_positions, self.shapes.batch, self.span, span, 1, NO_POSITION)
        for flat in self.flat_scales if self.shapes.scaled_cache else ():
            relayout(flat, head, self.span, span, 1, 0)
        self.span = span
        self.relayouts += 1
        return True

    def write(self, new_k: np.ndarray, new_v: np.ndarray, positions: np.ndarray, new_scales=None) -> None:
        """Put a chunk's keys/values (L, B, Hkv, T, D) into slots position % S (the span holds them);
        an int8 cache's scales (L, B, Hkv, T) each too."""
        rows, cols, slots = ring_writes(positions, self.shapes.cache_slots)
        cache_k, cache_v = self.cache_k, self.cache_v
        cache_k[:, rows, :, slots] = new_k[:, rows, :, cols]  # (n, L, Hkv, D) on both sides
        cache_v[:, rows, :, slots] = new_v[:, rows, :, cols]
        for scale, new in zip(self.scales, new_scales) if new_scales is not None else ():
            scale[:, rows, :, slots] = new[:, rows, :, cols]  # (n, L, Hkv)
        self.cache_positions[rows, slots] = positions[rows, cols]
        np.maximum.at(self.extent, rows, positions[rows, cols] + 1)

    def reset(self, rows=None) -> None:
        index = slice(None) if rows is None else list(rows)
        self.cache_k[:, index] = 0  # (L, rows, Hkv, s, D)
        self.cache_v[:, index] = 0
        self.cache_positions[index] = NO_POSITION  # (rows, s)
        for scale in self.scales if self.shapes.scaled_cache else ():
            scale[:, index] = 0  # (L, rows, Hkv, s)
        self.extent[index] = 0


def longest_extent(extent: np.ndarray, positions: np.ndarray) -> int:
    """The longest row's extent (highest position + 1) after a step feeding `positions` (B, T), given
    each row's extent (B,) before it."""
    live = positions[positions != NO_POSITION]
    return max(int(extent.max()), int(live.max()) + 1 if live.size else 0)


def bucket_needed(buckets: tuple[int, ...], extent: np.ndarray, positions: np.ndarray, slots: int) -> int:
    """The smallest of `buckets` holding every row's extent (B,) after a step feeding `positions` (B, T):
    `slots` (the whole ring) once a row has wrapped."""
    longest = longest_extent(extent, positions)
    return next((s for s in buckets if s >= longest), slots)


def relayout(flat: np.ndarray, blocks: int, old: int, new: int, tail: int, fill) -> None:
    """Turn `flat`'s first blocks*old*tail elements, (blocks, old, tail), into (blocks, new, tail) in place:
    growing keeps each block's `old` rows and fills the rest with `fill`; shrinking keeps the first `new`.

    Growing moves blocks last first and shrinking first first, so no block overwrites one not yet moved
    (numpy copies an overlapping slice within a block correctly)."""
    keep = min(old, new) * tail
    order = range(blocks - 1, -1, -1) if new > old else range(blocks)
    for i in order:
        flat[i * new * tail:i * new * tail + keep] = flat[i * old * tail:i * old * tail + keep]
        if new > old:
            flat[i * new * tail + keep:(i + 1) * new * tail] = fill
