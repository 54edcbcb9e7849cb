"""The rolling KV cache as torch tensors, shared by the torch-driven backends (eager, AOTI, TensorRT)."""
from __future__ import annotations

import numpy as np
import torch

from mixtral_export.artifact.contract import NO_POSITION, StepShapes
from mixtral_export.runtimes.step import ring_writes


class TorchRing:
    """Keys/values (L, B, Hkv, S, D) after RoPE and the position each slot holds (B, S), on one device."""

    def __init__(self, shapes: StepShapes, device: torch.device):
        self.shapes = shapes
        self.cache_k = torch.zeros(shapes.cache_shape(), dtype=getattr(torch, shapes.dtype), device=device)  # (L, B, Hkv, S, D)
        self.cache_v = torch.zeros_like(self.cache_k)  # (L, B, Hkv, S, D)
        self.cache_positions = torch.full((shapes.batch, shapes.cache_slots), NO_POSITION, dtype=torch.int64,
                                    device=device)  # (B, S)

    def reset(self, rows=None) -> None:
        clear(self.cache_k, self.cache_v, self.cache_positions, rows)

    def write(self, new_k: torch.Tensor, new_v: torch.Tensor, positions: np.ndarray) -> None:
        """Put a chunk's keys/values (L, B, Hkv, T, D) into slots position % S, real tokens only."""
        device = self.cache_k.device
        rows, cols, slots = (torch.from_numpy(a).to(device) for a in ring_writes(positions, self.shapes.cache_slots))
        self.cache_k[:, rows, :, slots] = new_k[:, rows, :, cols]  # (n, L, Hkv, D) on both sides
        self.cache_v[:, rows, :, slots] = new_v[:, rows, :, cols]
        self.cache_positions[rows, slots] = torch.from_numpy(np.ascontiguousarray(positions)).to(device)[rows, cols]


def clear(cache_k: torch.Tensor, cache_v: torch.Tensor, cache_positions: torch.Tensor, rows=None) -> None:
    """Zero the keys/values (L, B, ...) and free the slots (B, S) of `rows` (all when None)."""
    index = slice(None) if rows is None else torch.tensor(list(rows), dtype=torch.int64, device=cache_k.device)
    cache_k[:, index] = 0
    cache_v[:, index] = 0
    cache_positions[index] = NO_POSITION
