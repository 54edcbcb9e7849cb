"""The pipeline backend: a staged artifact's stages chained behind the one step contract.

A staged artifact (graphs/onnx_stages.py) is N graphs, each a contiguous range of layers with its
own ring cache. `PipelineBackend.step` checks the step's inputs once, then runs the ids through
stage 0, its hidden state (B, T, H) through stage 1, and so on; the last stage's logits are the
step's. `reset` clears the rows in every stage's ring. To the engine (runtimes/engine.py) it is one
more StepBackend, so continuous batching, sampling and verify run over it unchanged.

Where the stages run is the `stages` object's business: `LocalStages` holds one OrtBackend per
stage in this process (tests, small machines); runtimes/ray_stages.py's `RayStages` one Ray actor
per stage, each able to sit on its own machine. Torch-free, like the ORT backend it chains.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from mixtral_export.artifact.manifest import Manifest, load_stage
from mixtral_export.runtimes.step import check_step_inputs


class Stages(Protocol):
    """Runs a staged artifact's stages in order: ids (B, T) -> logits (B, T, V), every ring written."""

    def run(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        ...

    def reset(self, rows: Sequence[int] | None = None) -> None:
        ...

    def stage_bytes(self) -> list[int]:
        """Each stage's weight and graph bytes, as its folder holds them."""
        ...


class LocalStages:
    """Every stage an OrtBackend in this process; each stage is checked to belong to this export."""

    def __init__(self, top: Manifest, provider: str = "cpu", threads: int | None = None, verify_files: bool = True):
        from mixtral_export.runtimes.ort import OrtBackend

        manifests = [load_stage(top, index, verify_files=False) for index in range(len(top.stages))]
        self.backends = [OrtBackend(stage.folder, provider=provider, threads=threads, verify_files=verify_files)
                         for stage in manifests]  # every folder found and checked before any loads

    def run(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        last = self.backends[-1]
        x = input_ids if last.manifest.table is None else last.embed(input_ids)  # a tied table: the last stage's
        for backend in self.backends:
            x = backend.run(x, positions)  # (B, T, H) between stages, (B, T, V) out of the last
        return x

    def reset(self, rows=None) -> None:
        for backend in self.backends:
            backend.reset(rows)

    def stage_bytes(self) -> list[int]:
        return [sum(entry.size for entry in b.manifest.files.values()) for b in self.backends]


class PipelineBackend:
    """StepBackend over a staged artifact: its stages in this process or on Ray."""

    def __init__(self, manifest: Manifest, stages: Stages, name: str = "ort"):
        self.manifest, self.stages, self.name = manifest, stages, name
        self.shapes = manifest.shapes

    def reset(self, rows=None) -> None:
        self.stages.reset(rows)

    def step(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        check_step_inputs(self.shapes, self.shapes.vocab_size, input_ids, positions)
        return self.stages.run(np.ascontiguousarray(input_ids, dtype=np.int64),
                               np.ascontiguousarray(positions, dtype=np.int64))

    def close(self) -> None:
        """Let the stages go (Ray actors are killed; in-process sessions are dropped with the backend)."""
        close = getattr(self.stages, "close", None)
        if close is not None:
            close()


def open_pipeline(manifest: Manifest, provider: str = "cpu", threads: int | None = None, ray: bool = False,
                  stage_options: Sequence[dict] | dict | None = None,
                  stage_folders: Sequence[str | Path] | None = None, verify_files: bool = True) -> PipelineBackend:
    """A PipelineBackend over the staged artifact `manifest`: all stages in this process, or with
    `ray` one Ray actor each (runtimes/ray_stages.py: `stage_options` are each actor's Ray options,
    resources and placement; `stage_folders` where each stage's folder is on its machine)."""
    if not ray:
        return PipelineBackend(manifest, LocalStages(manifest, provider, threads, verify_files))
    from mixtral_export.runtimes.ray_stages import RayStages

    return PipelineBackend(manifest, RayStages(manifest, provider, threads, stage_options, stage_folders,
                                               verify_files))
