"""The eager PyTorch backend: MixtralStatic with its ring cache held in torch tensors."""
from __future__ import annotations

import numpy as np
import torch

from graphs.contract import NO_POSITION, StepShapes
from mixtral_export.model import TORCH_DTYPES, MixtralStatic
from runtimes.step import check_step_inputs, ring_writes


class EagerBackend:
    name = "eager"

    def __init__(self, model: MixtralStatic, shapes: StepShapes, device: str | torch.device = "cpu"):
        if model.attention_window != shapes.attention_window:
            raise ValueError(f"model attends to {model.attention_window} positions, "
                             f"shapes say {shapes.attention_window}")
        self.model = model.to(device)
        self.shapes = shapes
        self.device = torch.device(device)
        dtype = TORCH_DTYPES[shapes.dtype]
        self.cache_k = torch.zeros(shapes.cache_shape(), dtype=dtype, device=self.device)  # (L, B, Hkv, S, D)
        self.cache_v = torch.zeros_like(self.cache_k)
        self.cache_positions = torch.full((shapes.batch, shapes.cache_slots), NO_POSITION,
                                          dtype=torch.int64, device=self.device)  # (B, S)

    @classmethod
    def from_checkpoint(cls, folder, shapes_kwargs: dict | None = None, device="cpu") -> "EagerBackend":
        from mixtral_export.checkpoint import load_model
        from mixtral_export.config import MixtralConfig

        config = MixtralConfig.from_json(folder)
        shapes = StepShapes.for_config(config, **(shapes_kwargs or {}))
        model = load_model(folder, dtype=shapes.dtype, attention_window=shapes.attention_window)
        return cls(model, shapes, device)

    def reset(self) -> None:
        self.cache_k.zero_()
        self.cache_v.zero_()
        self.cache_positions.fill_(NO_POSITION)

    @torch.inference_mode()
    def step(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        check_step_inputs(self.shapes, self.shapes.vocab_size, input_ids, positions)
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.device)
        pos = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64)).to(self.device)
        logits, new_k, new_v = self.model(ids, pos, self.cache_k, self.cache_v, self.cache_positions)
        self.write_ring(new_k, new_v, positions)
        return logits.cpu().numpy()

    def write_ring(self, new_k: torch.Tensor, new_v: torch.Tensor, positions: np.ndarray) -> None:
        rows, cols, slots = (torch.from_numpy(a).to(self.device)
                             for a in ring_writes(positions, self.shapes.cache_slots))
        self.cache_k[:, rows, :, slots] = new_k[:, rows, :, cols]  # (n, L, Hkv, D) on both sides
        self.cache_v[:, rows, :, slots] = new_v[:, rows, :, cols]
        self.cache_positions[rows, slots] = torch.from_numpy(positions).to(self.device)[rows, cols]
