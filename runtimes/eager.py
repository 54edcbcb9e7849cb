"""The eager PyTorch backend: MixtralStatic with its ring cache held in torch tensors.

Like ONNX Runtime it attends over the span of the ring in use (artifact/contract.py: spans): the
smallest span bucket holding every slot written, passed as views of the ring's first slots (torch
reads them in place), the whole ring once a row has wrapped. `spans=False` keeps the whole ring.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from mixtral_export.artifact.contract import StepShapes
from mixtral_export.model import MixtralStatic
from mixtral_export.runtimes.step import check_step_inputs
from mixtral_export.runtimes.torch_ring import TorchRing


class EagerBackend:
    name = "eager"

    def __init__(self, model: MixtralStatic, shapes: StepShapes, device: str | torch.device = "cpu",
                 spans: bool = True):
        if model.attention_window != shapes.attention_window:
            raise ValueError(f"model attends to {model.attention_window} positions, "
                             f"shapes say {shapes.attention_window}")
        self.model = model.to(device)
        self.shapes = shapes
        self.device = torch.device(device)
        self.ring = TorchRing(shapes, self.device)
        # the eager model takes any span, whatever the artifact's graph does
        self.buckets = replace(shapes, span_axis=spans)
        self.span = shapes.cache_slots  # the slots the last step attended over

    @classmethod
    def from_checkpoint(cls, folder, shapes_kwargs: dict | None = None, device="cpu") -> "EagerBackend":
        from mixtral_export.checkpoint import load_model
        from mixtral_export.artifact.config import MixtralConfig

        config = MixtralConfig.from_json(folder)
        shapes = StepShapes.for_config(config, **(shapes_kwargs or {}))
        model = load_model(folder, dtype=shapes.dtype, attention_window=shapes.attention_window)
        return cls(model, shapes, device)

    def reset(self, rows=None) -> None:
        self.ring.reset(rows)

    @torch.inference_mode()
    def step(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        check_step_inputs(self.shapes, self.shapes.vocab_size, input_ids, positions)
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.device)
        pos = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64)).to(self.device)
        ring = self.ring
        written = int(ring.cache_positions.max()) + 1  # past the highest position in the ring (0: empty)
        self.span = s = self.buckets.tight_span(max(written, int(positions.max()) + 1))
        logits, new_k, new_v = self.model(ids, pos, ring.cache_k[:, :, :, :s], ring.cache_v[:, :, :, :s],
                                          ring.cache_positions[:, :s])  # views: (L, B, Hkv, s, D), (B, s)
        ring.write(new_k, new_v, positions)
        return logits.cpu().numpy()
