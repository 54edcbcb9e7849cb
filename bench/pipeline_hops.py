"""What pipeline stages cost per decode step, what each stage process holds, and what row groups buy.

    python3 -m mixtral_export.bench.pipeline_hops --work-dir WORK --rounds 3 --steps 24
    python3 -m mixtral_export.bench.pipeline_hops --work-dir WORK --row-groups 1,2,4 --rounds 3 --steps 12

For each model and batch it exports the whole artifact and 2- and 4-stage artifacts, then times
decode steps (T = 1): the whole artifact in this process (the baseline), its stages chained in
this process, and on a local Ray cluster the whole artifact in one actor (1 stage) and the stages
one actor each. Each configuration runs round by round interleaved with the baseline (one beside
it at a time, so the widest model's copies fit in memory); a row prints the median step and its
ratio to the baseline's median over the same rounds. Then, on the widest model at batch 1, the resident memory
(VmRSS) of each stage actor's process after a step, against an actor holding the whole artifact.

With `--row-groups`, instead: decode steps of B rows (every row live) through 2 and 4 stages, in
this process and on Ray, with the rows in G groups of B / G (each G its own export at batch
B / G, the same weights), all G interleaved round by round, driven two ways: `step` calls the
backend's step (the G groups as one wave through the stages, then the next step), `engine` runs
B requests through the engine, which keeps the groups in flight across steps; a row prints the
median step, its ratio to G = 1's over the same rounds, and on Ray how busy the stages were (the
actors' own clocks: the mean stage's run time over the steps' wall time).

Models: `tiny-4l` (the tiny model with 4 layers) and `mixtral-width-4l` (Mixtral 8x7B's hidden
size 4096, 32/8 heads x 128, vocab 32000, but experts of 256 instead of 14336: the hidden state
that crosses a hop and the attention and embedding bytes are Mixtral's, 4 layers of its experts
would be 22.5 GB of fp32 and do not fit this machine twice).
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from mixtral_export.artifact.config import MixtralConfig
from mixtral_export.bench.load_memory import MIXTRAL_8X7B

SPLITS = (1, 2, 4)


def models() -> dict[str, MixtralConfig]:
    from mixtral_export.tiny import TINY_CONFIG

    wide = MixtralConfig(num_hidden_layers=4, dtype="float32", **{**MIXTRAL_8X7B, "intermediate_size": 256})
    return {"tiny-4l": replace(TINY_CONFIG, num_hidden_layers=4), "mixtral-width-4l": wide}


def build(work: Path, name: str, config: MixtralConfig, batch: int, splits=SPLITS) -> dict[int, Path]:
    """{stages: artifact} for 1 (whole), 2 and 4 stages at this batch; reused when already built."""
    from mixtral_export.graphs.onnx_export import export_onnx
    from mixtral_export.tiny import random_weights, write_checkpoint

    checkpoint = work / name / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        write_checkpoint(checkpoint, config, random_weights(config), max_shard_bytes=1 << 30)
    out = {}
    for stages in splits:
        art = work / name / f"b{batch}-s{stages}"
        if not (art / "manifest.json").is_file():
            export_onnx(checkpoint, art, dtype="float32", batch=batch, prefill_chunk=16, cache_slots=64, slide=True,
                        stages=None if stages == 1 else stages)
        out[stages] = art
    return out


class WholeActor:
    """A Ray-hosted whole artifact behind the same `run` as a stage: the 1-stage Ray pipeline."""

    def __init__(self, ray, folder: Path):
        from mixtral_export.runtimes.ray_stages import StageActor

        self.actor = ray.remote(StageActor).options(num_cpus=0).remote(str(folder), "cpu", None, False)
        self.ray = ray
        self.pid = ray.get(self.actor.describe.remote())[2]["pid"]

    def step(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self.ray.get(self.actor.run.remote(ids, positions))

    def close(self) -> None:
        self.ray.kill(self.actor)


def decode_seconds(backend, batch: int, steps: int, start: int) -> list[float]:
    """Seconds per decode step over `steps` steps, every row live, positions from `start`."""
    ids = np.full((batch, 1), 5, dtype=np.int64)
    times = []
    for n in range(steps):
        positions = np.full((batch, 1), start + n, dtype=np.int64)
        began = time.perf_counter()
        backend.step(ids, positions)
        times.append(time.perf_counter() - began)
    return times


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def stage_busy(backend, seconds: float) -> float:
    """On Ray: the mean stage's run time (its actor's clock) over `seconds` of steps; clears the record."""
    runs = backend.stages.runs()
    return sum(end - start for stage in runs for _, start, end in stage) / len(runs) / seconds


def engine_seconds(backend, batch: int, steps: int) -> list[float]:
    """Seconds per decode step through the engine (runtimes/engine.py, row groups in flight when the
    backend has them): `batch` requests of a 4-token prompt, timed from the step where every one has
    its first token to the end of `steps` more; one figure per request-token over all rows."""
    from mixtral_export.runtimes.engine import Engine
    from mixtral_export.runtimes.requests import GenerationConfig

    engine = Engine(backend)
    handles = [engine.submit([5, 6, 7, 8], GenerationConfig(max_new_tokens=steps + 1, eos_token_ids=()))
               for _ in range(batch)]
    counted, began = 0, None
    for _ in engine.drive(handles):
        counted += 1
        if counted == batch:
            began = time.perf_counter()  # every row has prefilled and sampled its first token
    return [(time.perf_counter() - began) / steps] * steps


def row_groups(args, ray) -> None:
    """G = 1 against G = 2, 4 for B rows, per model, stage count, host and driver; interleaved round by round."""
    from mixtral_export.runtimes.load import open_step_backend
    from mixtral_export.runtimes.pipeline import wave_threads

    counts = [int(g) for g in args.row_groups.split(",")]
    batch = args.rows
    if counts[0] != 1 or any(batch % g for g in counts):
        raise SystemExit(f"--row-groups must start with 1 and divide --rows {batch}")
    print("| model | B | stages | where | driver | G | ms/step (median) | vs G = 1 | stages busy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        config = models()[name]
        built = {g: build(args.work_dir, name, config, batch // g, splits=(2, 4)) for g in counts}
        for stages in (2, 4):
            for where in ("process", "ray"):
                backends = {g: open_step_backend(built[g][stages], "ort", ray=where == "ray", row_groups=g,
                                                 threads=wave_threads(g, stages))[0] for g in counts}
                for driver in ("step", "engine"):  # one wave per step, or the engine's groups in flight
                    def timed(backend, r):
                        if driver == "engine":
                            return engine_seconds(backend, batch, args.steps)
                        return decode_seconds(backend, batch, args.steps, 4 + r * args.steps)

                    for backend in backends.values():
                        timed(backend, 0)  # warm
                        if where == "ray":
                            backend.stages.runs()
                    times = {g: [] for g in counts}
                    for r in range(args.rounds):  # interleaved, round by round
                        for g, backend in backends.items():
                            times[g] += timed(backend, r)
                    base = statistics.median(times[1])
                    for g, backend in backends.items():
                        median = statistics.median(times[g])
                        busy = f"{stage_busy(backend, sum(times[g])):.0%}" if where == "ray" else "-"
                        print(f"| {name} | {batch} | {stages} | {where} | {driver} | {g} | {median * 1e3:.2f} | "
                              f"{median / base:.2f}x | {busy} |", flush=True)
                for backend in backends.values():
                    backend.close()
                del backends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("out/pipeline-hops"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--models", default="tiny-4l,mixtral-width-4l")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--row-groups", default=None, help="e.g. 1,2,4: compare row groups instead")
    parser.add_argument("--rows", type=int, default=4, help="with --row-groups: the rows B, every one live")
    args = parser.parse_args()
    from mixtral_export.runtimes.load import open_step_backend
    from mixtral_export.runtimes.ray_stages import start_ray

    start_ray()
    import ray

    if args.row_groups:
        row_groups(args, ray)
        ray.shutdown()
        return

    print("| model | B | stages | where | ms/step (median) | vs whole in process |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        config = models()[name]
        for batch in map(int, args.batches.split(",")):
            artifacts = build(args.work_dir, name, config, batch)
            baseline = open_step_backend(artifacts[1], "ort")[0]
            decode_seconds(baseline, batch, 4, 0)  # warm
            rss = {}
            for stages in SPLITS:
                for where in ("process", "ray"):
                    if (stages, where) == (1, "process"):
                        continue
                    # one configuration beside the baseline at a time: the widest model's copies fit
                    backend = (WholeActor(ray, artifacts[1]) if stages == 1 else
                               open_step_backend(artifacts[stages], "ort", ray=where == "ray")[0])
                    decode_seconds(backend, batch, 4, 0)  # warm
                    ours, base = [], []
                    for r in range(args.rounds):  # interleaved with the baseline, round by round
                        start = 4 + r * args.steps
                        base += decode_seconds(baseline, batch, args.steps, start)
                        ours += decode_seconds(backend, batch, args.steps, start)
                    if stages == 1:
                        print(f"| {name} | {batch} | 1 | process | {statistics.median(base) * 1e3:.2f} | 1.00x |")
                    median = statistics.median(ours)
                    print(f"| {name} | {batch} | {stages} | {where} | {median * 1e3:.2f} | "
                          f"{median / statistics.median(base):.2f}x |", flush=True)
                    if where == "ray":
                        pids = [backend.pid] if stages == 1 else [p["pid"] for p in backend.stages.processes]
                        rss[stages] = [rss_bytes(pid) for pid in pids]
                    close = getattr(backend, "close", None)
                    if close:
                        close()
                    del backend
            if name == "mixtral-width-4l" and batch == min(map(int, args.batches.split(","))):
                data = sum(f.stat().st_size for f in artifacts[1].rglob("*.data"))
                print(f"\nRSS of each stage actor's process after its steps ({name}, B={batch}; the whole "
                      f"artifact's weights: {data / 2**20:.0f} MiB):")
                for stages, values in rss.items():
                    label = "whole artifact, 1 actor" if stages == 1 else f"{stages} stages"
                    print(f"  {label}: " + ", ".join(f"{v / 2**20:.0f} MiB" for v in values), flush=True)
            del baseline
    ray.shutdown()


if __name__ == "__main__":
    main()
