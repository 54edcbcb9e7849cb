"""The eager PyTorch head backend: HeadModel (mixtral_export/head_model.py) on its source checkpoint."""
from __future__ import annotations

import numpy as np
import torch

from mixtral_export.artifact.contract import HeadShapes
from mixtral_export.head_model import HeadModel
from mixtral_export.runtimes.heads import check_head_inputs


class EagerHeadBackend:
    name = "eager"

    def __init__(self, model: HeadModel, shapes: HeadShapes, device: str | torch.device = "cpu"):
        if model.head.kind != shapes.head:
            raise ValueError(f"model computes the {model.head.kind} head, shapes say {shapes.head}")
        self.model = model.to(device)
        self.shapes = shapes
        self.device = torch.device(device)

    @torch.inference_mode()
    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        check_head_inputs(self.shapes, self.model.body.config.vocab_size, input_ids, attention_mask)
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.device)  # (B, T)
        mask = torch.from_numpy(np.ascontiguousarray(attention_mask, dtype=np.int64)).to(self.device)  # (B, T)
        outputs = self.model(ids, mask)
        return {name: value.cpu().numpy() for name, value in zip(self.shapes.output_names, outputs)}
