"""The pipeline backend: a staged artifact's stages chained behind the one step contract.

A staged artifact (graphs/onnx_stages.py) is N graphs, each a contiguous range of layers with its
own ring cache. `PipelineBackend.step` checks the step's inputs once, then runs the ids through
stage 0, its hidden state (B, T, H) through stage 1, and so on; the last stage's logits are the
step's. `reset` clears the rows in every stage's ring. To the engine (runtimes/engine.py) it is one
more StepBackend, so continuous batching, sampling and verify run over it unchanged.

Row groups (`groups` G > 1, docs/pipeline.md): the engine sees G x B rows, row r in group r // B,
each stage one ring per group behind its one session; a step's groups go through the stages as a
wave, stage k on group g while stage k + 1 runs group g - 1, and a group with no token in the
step is not run. Every row computes what it computes with G = 1: only the order of work changes.

Where the stages run is the `stages` object's business: `LocalStages` holds one OrtBackend per
stage in this process (tests, small machines; with G > 1 one worker thread per stage, ONNX
Runtime releasing the GIL); runtimes/ray_stages.py's `RayStages` one Ray actor per stage, each
able to sit on its own machine. Torch-free, like the ORT backend it chains.
"""
from __future__ import annotations

import os
import queue
import threading
from dataclasses import replace
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from mixtral_export.artifact.contract import NO_POSITION
from mixtral_export.artifact.manifest import Manifest, load_stage
from mixtral_export.errors import UsageError
from mixtral_export.runtimes.step import check_step_inputs

Group = tuple[int, np.ndarray, np.ndarray]  # (group, its ids (B, T), its positions (B, T))


class Stages(Protocol):
    """Runs a staged artifact's stages in order, group by group: each group's ids (B, T) -> its
    logits (B, T, V), the group's ring written in every stage."""

    def start(self, groups: Sequence[Group]) -> object:
        """Start the groups through the stages without waiting for them: a ticket for `finish`."""
        ...

    def finish(self, ticket: object) -> list[np.ndarray]:
        """The started groups' logits, in their order (waits)."""
        ...

    def reset(self, rows: Sequence[int] | None = None) -> None:
        ...

    def stage_bytes(self) -> list[int]:
        """Each stage's weight and graph bytes, as its folder holds them."""
        ...


class LocalStages:
    """Every stage an OrtBackend in this process; each stage is checked to belong to this export.
    With several groups one worker thread per stage runs them as a wave (StageWorkers)."""

    def __init__(self, top: Manifest, provider: str = "cpu", threads: int | None = None, verify_files: bool = True,
                 groups: int = 1):
        from mixtral_export.runtimes.ort import OrtBackend

        manifests = [load_stage(top, index, verify_files=False) for index in range(len(top.stages))]
        threads = threads or wave_threads(groups, len(manifests))
        self.backends = [OrtBackend(stage.folder, provider=provider, threads=threads, verify_files=verify_files,
                                    groups=groups)
                         for stage in manifests]  # every folder found and checked before any loads
        self.workers = StageWorkers(self.backends) if groups > 1 and len(self.backends) > 1 else None

    def start(self, groups: Sequence[Group]) -> object:
        """To the stage workers; without them (one group) the stages run here and now."""
        last = self.backends[-1]
        firsts = [ids if last.manifest.table is None else last.embed(ids) for _, ids, _ in groups]  # tied: the last's
        if self.workers is not None:
            return self.workers.start([(group, first, positions)
                                       for (group, _, positions), first in zip(groups, firsts)])
        outs = []
        for (group, _, positions), x in zip(groups, firsts):
            for backend in self.backends:
                x = backend.run(x, positions, group)  # (B, T, H) between stages, (B, T, V) out of the last
            outs.append(x)
        return outs

    def finish(self, ticket) -> list[np.ndarray]:
        return self.workers.finish(ticket) if self.workers is not None else ticket

    def reset(self, rows=None) -> None:
        for backend in self.backends:
            backend.reset(rows)

    def stage_bytes(self) -> list[int]:
        return [sum(entry.size for entry in b.manifest.files.values()) for b in self.backends]

    def close(self) -> None:
        if self.workers is not None:
            self.workers.close()
            self.workers = None


class StageWorkers:
    """One thread per stage, each taking (group, input, positions) jobs in order from its inbox and
    handing its output to the next stage's: stage k runs group g while stage k + 1 runs group g - 1.
    Each stage's backend is only ever run by its own thread, one group at a time."""

    def __init__(self, backends: Sequence):
        self.backends = list(backends)
        self.inboxes = [queue.SimpleQueue() for _ in self.backends]
        self.threads = [threading.Thread(target=self._serve, args=(k,), name=f"stage-{k}", daemon=True)
                        for k in range(len(self.backends))]
        for thread in self.threads:
            thread.start()

    def start(self, groups: Sequence[Group]) -> tuple[list[int], queue.SimpleQueue]:
        """Each group's first input to stage 0's inbox; the ticket `finish` waits on."""
        results: queue.SimpleQueue = queue.SimpleQueue()
        for group, first, positions in groups:
            self.inboxes[0].put((group, first, positions, results))
        return [group for group, _, _ in groups], results

    def finish(self, ticket: tuple[list[int], queue.SimpleQueue]) -> list[np.ndarray]:
        """The groups' outputs in their order, once every one is out (a failed group's error is raised
        then, so no stage still works on a step whose caller has moved on)."""
        groups, results = ticket
        outs = dict(results.get() for _ in groups)
        error = next((out for out in outs.values() if isinstance(out, BaseException)), None)
        if error is not None:
            raise error
        return [outs[group] for group in groups]

    def _serve(self, stage: int) -> None:
        backend, inbox = self.backends[stage], self.inboxes[stage]
        last = stage == len(self.backends) - 1
        while (job := inbox.get()) is not None:
            group, x, positions, results = job
            try:
                x = backend.run(x, positions, group)  # (B, T, H) | (B, T, V)
            except BaseException as error:  # the step's caller raises it
                results.put((group, error))
                continue
            if last:
                results.put((group, x))
            else:
                self.inboxes[stage + 1].put((group, x, positions, results))

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for thread in self.threads:
            thread.join()


def wave_threads(groups: int, stages: int) -> int | None:
    """Each stage's intra-op threads when several groups share this machine's cores: up to
    min(groups, stages) stages run at once, so each gets that share (None, all of them, for one group)."""
    if groups <= 1:
        return None
    return max(1, len(os.sched_getaffinity(0)) // min(groups, stages))


class PipelineBackend:
    """StepBackend over a staged artifact: its stages in this process or on Ray, its rows in `groups`
    groups of the graphs' batch each."""

    def __init__(self, manifest: Manifest, stages: Stages, name: str = "ort", groups: int = 1):
        self.manifest, self.stages, self.name, self.groups = manifest, stages, name, groups
        self.group_rows = manifest.shapes.batch  # B of every stage graph
        self.shapes = replace(manifest.shapes, batch=groups * self.group_rows)  # what the engine sees

    def reset(self, rows=None) -> None:
        self.stages.reset(rows)

    def step(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        check_step_inputs(self.shapes, self.shapes.vocab_size, input_ids, positions)
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        if self.groups == 1:
            return self.stages.finish(self.stages.start([(0, input_ids, positions)]))[0]
        b, chunk = self.group_rows, input_ids.shape[1]
        busy = (positions != NO_POSITION).reshape(self.groups, b * chunk).any(axis=1)  # (G,) groups with a token
        groups = [(g, input_ids[g * b:(g + 1) * b], positions[g * b:(g + 1) * b]) for g in map(int, np.flatnonzero(busy))]
        logits = np.zeros((self.shapes.batch, chunk, self.shapes.vocab_size), np.float32)  # (G*B, T, V)
        for (g, _, _), out in zip(groups, self.stages.finish(self.stages.start(groups)) if groups else []):
            logits[g * b:(g + 1) * b] = out
        return logits

    def start_group(self, group: int, input_ids: np.ndarray, positions: np.ndarray) -> object:
        """Start one group's step (its rows' ids and positions, (B, T)) behind the groups in flight
        (GroupedStepBackend, runtimes/step.py); `finish_group` waits for its logits (B, T, V)."""
        check_step_inputs(self.manifest.shapes, self.shapes.vocab_size, input_ids, positions)
        if not 0 <= group < self.groups:
            raise ValueError(f"group {group} is not one of the {self.groups} row groups")
        return self.stages.start([(group, np.ascontiguousarray(input_ids, dtype=np.int64),
                                   np.ascontiguousarray(positions, dtype=np.int64))])

    def finish_group(self, ticket: object) -> np.ndarray:
        return self.stages.finish(ticket)[0]

    def close(self) -> None:
        """Let the stages go (Ray actors are killed; in-process sessions are dropped with the backend)."""
        close = getattr(self.stages, "close", None)
        if close is not None:
            close()


def open_pipeline(manifest: Manifest, provider: str = "cpu", threads: int | None = None, ray: bool = False,
                  stage_options: Sequence[dict] | dict | None = None,
                  stage_folders: Sequence[str | Path] | None = None, verify_files: bool = True,
                  row_groups: int = 1) -> PipelineBackend:
    """A PipelineBackend over the staged artifact `manifest`: all stages in this process, or with
    `ray` one Ray actor each (runtimes/ray_stages.py: `stage_options` are each actor's Ray options,
    resources and placement; `stage_folders` where each stage's folder is on its machine);
    `row_groups` groups of the graphs' B rows, in flight through the stages together."""
    check_row_groups(row_groups)
    if not ray:
        return PipelineBackend(manifest, LocalStages(manifest, provider, threads, verify_files, row_groups),
                               groups=row_groups)
    from mixtral_export.runtimes.ray_stages import RayStages

    return PipelineBackend(manifest, RayStages(manifest, provider, threads, stage_options, stage_folders,
                                               verify_files, row_groups), groups=row_groups)


def check_row_groups(row_groups) -> None:
    if isinstance(row_groups, bool) or not isinstance(row_groups, int) or row_groups < 1:
        raise UsageError(f"row_groups must be a positive integer, got {row_groups!r}")
