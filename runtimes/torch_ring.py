"""The rolling KV cache as torch tensors, shared by the torch-driven backends (eager, AOTI, TensorRT).

With `spans` it is laid out as runtimes/span_ring.py lays out the ONNX backend's numpy ring: flat
buffers viewed as (L, B, Hkv, s, D) over the span in use, so each layer's span is one contiguous
tensor, what a graph with a symbolic span axis (AOTI, TensorRT) reads in place. `fit` re-lays the
buffers out when the bucket changes (one copy of the span); new slots are empty and masked, so every
span computes the whole ring's result. Without it the views are the whole ring, always.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from mixtral_export.artifact.contract import NO_POSITION, StepShapes
from mixtral_export.runtimes.span_ring import bucket_needed
from mixtral_export.runtimes.step import ring_writes


class TorchRing:
    """Keys/values (L, B, Hkv, s, D) after RoPE and the position each slot holds (B, s), on one device;
    s = S unless `spans` (see the module docstring)."""

    def __init__(self, shapes: StepShapes, device: torch.device, spans: bool = False):
        self.shapes = shapes
        self.buckets = shapes.span_buckets if spans else (shapes.cache_slots,)
        dtype = getattr(torch, shapes.dtype)
        self.flat_k = torch.zeros(math.prod(shapes.cache_shape()), dtype=dtype, device=device)  # L*B*Hkv*S*D
        self.flat_v = torch.zeros_like(self.flat_k)
        self.flat_positions = torch.full((shapes.batch * shapes.cache_slots,), NO_POSITION, dtype=torch.int64,
                                         device=device)  # B*S
        self.extent = np.zeros(shapes.batch, dtype=np.int64)  # (B,) each row's highest position + 1
        self.span = self.buckets[0]
        self.relayouts = 0  # how many times the span changed (a copy each)

    @property
    def cache_k(self) -> torch.Tensor:
        return self.flat_k[:self.span_size].view(self.shapes.cache_shape(self.span))  # (L, B, Hkv, s, D)

    @property
    def cache_v(self) -> torch.Tensor:
        return self.flat_v[:self.span_size].view(self.shapes.cache_shape(self.span))  # (L, B, Hkv, s, D)

    @property
    def cache_positions(self) -> torch.Tensor:
        return self.flat_positions[:self.shapes.batch * self.span].view(self.shapes.batch, self.span)  # (B, s)

    @property
    def span_size(self) -> int:
        return math.prod(self.shapes.cache_shape(self.span))

    def span_needed(self, positions: np.ndarray) -> int:
        """The bucket a step feeding `positions` (B, T) needs: every row's extent after it fits."""
        return bucket_needed(self.buckets, self.extent, positions, self.shapes.cache_slots)

    def fit(self, span: int) -> bool:
        """Re-lay the buffers out for `span` slots (every row's extent must fit it); True if it changed."""
        if span == self.span:
            return False
        heads = self.shapes.num_layers * self.shapes.batch * self.shapes.num_kv_heads  # blocks of (s, D)
        relayout(self.flat_k, heads, self.span, span, self.shapes.head_dim, 0)
        relayout(self.flat_v, heads, self.span, span, self.shapes.head_dim, 0)
        relayout(self.flat_positions, self.shapes.batch, self.span, span, 1, NO_POSITION)
        self.span = span
        self.relayouts += 1
        return True

    def reset(self, rows=None) -> None:
        clear(self.cache_k, self.cache_v, self.cache_positions, rows)
        self.extent[slice(None) if rows is None else list(rows)] = 0

    def write(self, new_k: torch.Tensor, new_v: torch.Tensor, positions: np.ndarray) -> None:
        """Put a chunk's keys/values (L, B, Hkv, T, D) into slots position % S (the span holds them),
        real tokens only."""
        device = self.flat_k.device
        found = ring_writes(positions, self.shapes.cache_slots)
        rows, cols, slots = (torch.from_numpy(a).to(device) for a in found)
        cache_k, cache_v = self.cache_k, self.cache_v
        cache_k[:, rows, :, slots] = new_k[:, rows, :, cols]  # (n, L, Hkv, D) on both sides
        cache_v[:, rows, :, slots] = new_v[:, rows, :, cols]
        self.cache_positions[rows, slots] = torch.from_numpy(np.ascontiguousarray(positions)).to(device)[rows, cols]
        np.maximum.at(self.extent, found[0], positions[found[0], found[1]] + 1)


def relayout(flat: torch.Tensor, blocks: int, old: int, new: int, tail: int, fill) -> None:
    """Turn `flat`'s first blocks*old*tail elements, (blocks, old, tail), into (blocks, new, tail): each
    block keeps its first min(old, new) rows, new rows get `fill` (the kept rows go through one copy:
    torch refuses an assignment between overlapping slices)."""
    keep = min(old, new)
    kept = flat[:blocks * old * tail].view(blocks, old, tail)[:, :keep].clone()  # (blocks, keep, tail)
    after = flat[:blocks * new * tail].view(blocks, new, tail)  # (blocks, new, tail)
    after[:, :keep] = kept
    after[:, keep:] = fill


def clear(cache_k: torch.Tensor, cache_v: torch.Tensor, cache_positions: torch.Tensor, rows=None) -> None:
    """Zero the keys/values (L, B, ...) and free the slots (B, S) of `rows` (all when None)."""
    index = slice(None) if rows is None else torch.tensor(list(rows), dtype=torch.int64, device=cache_k.device)
    cache_k[:, index] = 0
    cache_v[:, index] = 0
    cache_positions[index] = NO_POSITION
