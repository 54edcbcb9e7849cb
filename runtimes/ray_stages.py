"""A staged artifact's stages as Ray actors: one actor per stage, hidden states passed actor to actor.

Each actor holds one stage's OrtBackend (its graph, weights and ring; torch-free). A step submits
stage 0's call with the ids, hands the ObjectRef of its hidden state straight to stage 1's call,
and so on; the driver waits only for the last stage's logits, so a step costs one round trip per
stage hop and no hidden state passes through the driver between stages. The object store was
chosen over compiled graphs (Ray's accelerated DAGs): a (B, T, H) hidden state is a few KB to a
few MB, passed inline, and an actor that dies must be restartable without rebuilding a compiled
graph (docs/pipeline.md).

With row groups (runtimes/pipeline.py) each actor holds one ring per group and a step submits
every group's calls before it waits: an actor runs its calls in the order submitted, so stage k
starts group g + 1 as soon as it hands group g on, while stage k + 1 runs group g. Each actor
keeps its runs' (group, start, end) times (`RayStages.runs`: what overlapped, where the bubble is).

Ray starts a private local cluster when RAY_ADDRESS is unset (its servers on loopback) and joins
that cluster otherwise. `stage_options` are each actor's Ray options (num_cpus, num_gpus,
resources, scheduling_strategy: one stage per machine or GPU); `stage_folders` say where each
stage's folder is on its machine (default: the artifact's path, the same on every machine).

Faults: an actor that dies fails the step it was in with `StageFailed` (the engine ends that step's
requests with it); Ray restarts the actor (max_restarts), which loads its stage again with an empty
ring, and the next step is admitted as usual.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Sequence

import numpy as np

from mixtral_export.artifact.manifest import Manifest, ManifestError, check_stage
from mixtral_export.errors import UsageError, UserError

LOCAL_ONLY_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a local cluster's servers bind loopback
DEFAULT_OPTIONS = {"num_cpus": 0, "max_restarts": -1, "max_task_retries": 0}
RESET_PATIENCE = 60.0  # seconds a reset waits for a restarting stage actor
RECENT_RUNS = 256  # the (group, start, end) a stage actor keeps for `runs`
STAGE_OPTION_KEYS = ("num_cpus", "num_gpus", "resources", "memory", "accelerator_type", "scheduling_strategy",
                     "max_restarts", "runtime_env")  # the Ray actor options a JSON file can give


def read_stage_options(path: str | Path) -> dict | list[dict]:
    """A JSON file of the stage actors' Ray options: one object for every stage, or a list of one
    object per stage (`{"resources": {"stage1": 1}}`, `{"num_gpus": 1}`); refused in one line."""
    try:
        options = json.loads(Path(path).read_text())
    except OSError as error:
        raise UsageError(f"{path}: {error.strerror}") from None
    except ValueError as error:
        raise UsageError(f"{path}: not JSON ({error})") from None
    for option in options if isinstance(options, list) else [options]:
        if not isinstance(option, dict):
            raise UsageError(f"{path}: stage options are one object or a list of one object per stage")
        unknown = sorted(set(option) - set(STAGE_OPTION_KEYS))
        if unknown:
            raise UsageError(f"{path}: unknown stage option {unknown[0]!r} (one of {', '.join(STAGE_OPTION_KEYS)})")
    return options


class StageFailed(RuntimeError):
    """A stage actor died during a step: the step's requests end with it; the actor restarts."""


class StageActor:
    """One pipeline stage in a Ray actor: loads its folder once, runs a chunk, resets rows."""

    def __init__(self, folder: str, provider: str, threads: int | None, verify_files: bool, groups: int = 1):
        from mixtral_export.runtimes.ort import OrtBackend

        self.backend, self.error = None, None
        self.recent: deque[tuple[int, float, float]] = deque(maxlen=RECENT_RUNS)
        try:
            self.backend = OrtBackend(folder, provider=provider, threads=threads, verify_files=verify_files,
                                      groups=groups)
        except UserError as error:  # reported by `describe` as one line, not as a dead actor's traceback
            self.error = str(error)
        except FileNotFoundError as error:
            self.error = f"{error.filename or folder}: {error.strerror}"

    def describe(self) -> tuple[str | None, Manifest | None, dict]:
        """(the load error, or None; the stage's manifest; this process: its pid, whether torch got imported,
        the Ray resources it holds)."""
        import ray

        process = {"pid": os.getpid(), "torch": "torch" in sys.modules,
                   "resources": ray.get_runtime_context().get_assigned_resources()}
        return self.error, None if self.backend is None else self.backend.manifest, process

    def run(self, first: np.ndarray, positions: np.ndarray, group: int = 0) -> np.ndarray:
        start = time.monotonic()
        out = self.backend.run(first, positions, group)
        self.recent.append((group, start, time.monotonic()))
        return out

    def runs(self) -> list[tuple[int, float, float]]:
        """(group, start, end) of the runs since the last call, at most the last RECENT_RUNS."""
        out = list(self.recent)
        self.recent.clear()
        return out

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self.backend.embed(input_ids)

    def reset(self, rows) -> None:
        self.backend.reset(rows)


def start_ray() -> bool:
    """Join the cluster at RAY_ADDRESS, or start a private local one; True when one was started here."""
    local = not os.environ.get("RAY_ADDRESS")
    if local:
        os.environ.setdefault(LOCAL_ONLY_VARIABLE, "0")  # read when ray is imported
    import ray

    if ray.is_initialized():
        return False
    options = {"address": "local", "_node_ip_address": "127.0.0.1"} if local else {}
    ray.init(include_dashboard=False, logging_level="warning", log_to_driver=False, **options)
    return local


class RayStages:
    """The stages of `top`, one Ray actor each, chained through the object store."""

    def __init__(self, top: Manifest, provider: str = "cpu", threads: int | None = None,
                 stage_options: Sequence[dict] | dict | None = None,
                 stage_folders: Sequence[str | Path] | None = None, verify_files: bool = True, groups: int = 1):
        count = len(top.stages)
        options = stage_options if isinstance(stage_options, (list, tuple)) else [stage_options or {}] * count
        folders = list(stage_folders) if stage_folders is not None else [top.stage_folder(i) for i in range(count)]
        if len(options) != count or len(folders) != count:
            raise ManifestError(f"{top.folder}: {count} stages, but {len(options)} stage options and "
                                f"{len(folders)} stage folders were given")
        for index, folder in enumerate(folders):  # a folder that is here too must be there: fail before Ray starts
            if stage_folders is None and not Path(folder).is_dir():
                raise ManifestError(f"{folder}: stage {index} of {top.folder} is missing; copy the artifact's "
                                    f"{top.stages[index]['folder']} folder there")
        self.started = start_ray()
        import ray

        self.ray = ray
        remote = ray.remote(StageActor)
        self.actors = [remote.options(**{**DEFAULT_OPTIONS, **option}).remote(str(folder), provider, threads,
                                                                             verify_files, groups)
                       for option, folder in zip(options, folders)]
        try:
            described = ray.get([actor.describe.remote() for actor in self.actors])
            for index, (error, manifest, _) in enumerate(described):
                if error is not None:
                    raise ManifestError(error)
                check_stage(top, index, manifest)
        except BaseException:
            self.close()
            raise
        self.bytes = [sum(entry.size for entry in m.files.values()) for _, m, _ in described]
        self.processes = [process for _, _, process in described]  # each actor's pid, torch-free or not
        self.tied = described[-1][1].table is not None  # the last stage looks the ids up

    def start(self, groups) -> list:
        """Every group's calls submitted, stage by stage (a tied model's lookups first), without waiting:
        each actor's queue holds group 0, 1, ... in order before its predecessor hands any on. The
        last stage's refs are the ticket."""
        refs = [self.actors[-1].embed.remote(ids) if self.tied else ids for _, ids, _ in groups]
        positions = [self.ray.put(p) for _, _, p in groups]
        for actor in self.actors:  # the hidden state's ref goes to the next actor as is
            refs = [actor.run.remote(ref, where, group) for ref, where, (group, _, _) in zip(refs, positions, groups)]
        return refs

    def finish(self, ticket: list) -> list[np.ndarray]:
        return self.wait(ticket)

    def runs(self) -> list[list[tuple[int, float, float]]]:
        """Each stage's (group, start, end) monotonic seconds of the runs since the last call (a
        machine's clock: comparable across the actors of one machine)."""
        return self.wait([actor.runs.remote() for actor in self.actors])

    def reset(self, rows=None) -> None:
        """Clear the rows in every stage. A stage whose actor died since the last step is restarting:
        the reset is sent again until it is back (RESET_PATIENCE seconds), then StageFailed."""
        deadline = time.monotonic() + RESET_PATIENCE
        while True:
            try:
                self.wait([actor.reset.remote(None if rows is None else list(rows)) for actor in self.actors])
                return
            except StageFailed:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def wait(self, refs):
        """ray.get, with a dead or unreachable stage turned into one StageFailed naming it."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        try:
            return self.ray.get(refs)
        except (RayActorError, ActorUnavailableError) as error:
            dead = getattr(error, "actor_id", None)
            index = next((i for i, a in enumerate(self.actors) if a._actor_id.hex() == dead), None)
            which = f"stage {index}" if index is not None else "a stage"
            raise StageFailed(f"pipeline {which}'s actor died or became unreachable during the step "
                              f"({type(error).__name__}); the requests in this step are ended and the stage is "
                              f"restarting") from None

    def stage_bytes(self) -> list[int]:
        return list(self.bytes)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)
        self.actors = []
        if self.started:
            self.ray.shutdown()
            self.started = False
