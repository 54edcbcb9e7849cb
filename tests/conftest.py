"""Session-wide fixtures: build the expensive things (checkpoints, exported graphs) once."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny model as a Hugging Face folder (safetensors, config, tokenizer.model)."""
    from mixtral_export.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny") / "checkpoint")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny model exported to ONNX: fp32, batch 2, prefill chunk 8, a 32-slot ring (its window)."""
    from mixtral_export.graphs.onnx_export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "tiny-fp32", dtype="float32",
                       batch=2, prefill_chunk=8, cache_slots=32)
