"""What a benchmark runs on: a checkpoint folder and the ONNX artifacts built from it, made once and reused.

`tiny` is the embedded tiny model. `mixtral-shaped` is Mixtral 8x7B's dimensions (hidden 4096,
8 experts of 14336 top-2, 32 heads / 8 kv heads x 128, vocab 32000, no sliding window) with only
`layers` layers of random fp32 weights (tiny.random_weights' decisive scales, so routing varies
from token to token): a real-size decode step per layer, without 90 GB of weights. Anything else
is a checkpoint folder. Built files go under the work folder; a later run reuses them when their
config (checkpoint) or manifest (artifact) still matches.

Building runs in processes of their own (`python3 -m bench.models SPEC`, one per checkpoint or
artifact, started by `build`): generating and exporting gigabytes of weights leaves a process's
memory high, and the benchmark process must stay small while each runtime's has the RAM to itself.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mixtral_export.bench.load_memory import MIXTRAL_8X7B
from mixtral_export.artifact.contract import StepShapes
from mixtral_export.artifact.config import MixtralConfig
from mixtral_export.errors import UserError

NAMED = ("tiny", "mixtral-shaped")
SHARD_BYTES = 1 << 30
PROGRESS = "bench: "  # the builder's progress lines on stderr start with this


class BenchError(UserError, ValueError):
    """Settings a benchmark cannot run with, or a build that failed; one line."""


@dataclass(frozen=True)
class BenchModel:
    name: str  # "tiny", "mixtral-shaped-1l" or the checkpoint folder's name
    checkpoint: Path
    config: MixtralConfig
    folder: Path  # where this model's artifacts go
    generated: bool  # True: the bench writes the checkpoint itself


def bench_model(model: str, layers: int, work_dir: Path) -> BenchModel:
    """Where a model's checkpoint and artifacts live, and its config; builds nothing."""
    if model == "tiny":
        from mixtral_export.tiny import TINY_CONFIG

        return BenchModel("tiny", work_dir / "tiny" / "checkpoint", TINY_CONFIG, work_dir / "tiny", True)
    if model == "mixtral-shaped":
        name = f"mixtral-shaped-{layers}l"
        config = MixtralConfig(num_hidden_layers=layers, dtype="float32", **MIXTRAL_8X7B)
        return BenchModel(name, work_dir / name / "checkpoint", config, work_dir / name, True)
    checkpoint = Path(model)
    if not (checkpoint / "config.json").is_file():
        raise BenchError(f"{checkpoint}: not a checkpoint folder, and not one of {', '.join(NAMED)}")
    return BenchModel(checkpoint.name, checkpoint, MixtralConfig.from_json(checkpoint / "config.json"),
                      work_dir / checkpoint.name, False)


def artifact_path(model: BenchModel, routing: str, shapes: StepShapes, weights: str = "fp32",
                  block_size: int = 32) -> Path:
    quantized = "" if weights == "fp32" else f"-{weights}-b{block_size}"
    chunks = "+".join(map(str, shapes.prefill_chunks))
    kv = f"-kv{shapes.kv_dtype}" if shapes.kv_dtype else ""
    return model.folder / f"onnx-{routing}-s{shapes.cache_slots}-p{chunks}{quantized}{kv}"


def build(model: str, layers: int, work_dir: Path, artifacts: list[tuple[str, StepShapes, str, int]],
          say: Callable[[str], None]) -> None:
    """Write the checkpoint, then export each artifact that is missing or stale, each step in a child
    process of its own (a torch export does not hand all its memory back, and two in one process ran
    a 2-layer mixtral-shaped build out of 24 GiB); progress lines go to `say` as they come."""
    base = {"model": model, "layers": layers, "work_dir": str(work_dir)}
    steps = [{**base, "artifact": None}] + [{**base, "artifact": (routing, shapes.to_dict(), weights, block)}
                                            for routing, shapes, weights, block in artifacts]
    for spec in steps:
        last = ""
        with subprocess.Popen([sys.executable, "-m", "mixtral_export.bench.models", json.dumps(spec)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as child:
            for line in child.stderr:
                if line.startswith(PROGRESS):
                    say(line[len(PROGRESS):].rstrip())
                elif line.strip():
                    last = line.strip()
        if child.returncode < 0:
            raise BenchError(f"building {model} failed: killed by signal {-child.returncode} (out of memory?)")
        if child.returncode != 0:
            why = last.removeprefix("error: ") or f"exit code {child.returncode}"
            raise BenchError(f"building {model} failed: {why}")


def write_checkpoint_if_stale(model: BenchModel, say: Callable[[str], None]) -> None:
    if not model.generated or matches(model.checkpoint, model.config):
        return
    say(f"writing the {model.name} checkpoint")
    if model.name == "tiny":
        from mixtral_export.tiny import write_tiny

        write_tiny(model.checkpoint)
    else:
        from mixtral_export.tiny import random_weights, write_checkpoint

        write_checkpoint(model.checkpoint, model.config, random_weights(model.config), max_shard_bytes=SHARD_BYTES)


def matches(checkpoint: Path, config: MixtralConfig) -> bool:
    try:
        return MixtralConfig.from_json(checkpoint / "config.json") == config
    except (OSError, ValueError):
        return False


def export_if_stale(model: BenchModel, routing: str, shapes: StepShapes, say: Callable[[str], None],
                    weights: str = "fp32", block_size: int = 32) -> Path:
    """The ONNX artifact for these shapes, routing and weights: the one already built, or a fresh export."""
    from mixtral_export.artifact.contract import WEIGHT_SCHEMES
    from mixtral_export.artifact.manifest import ManifestError, load_manifest
    from mixtral_export.graphs.onnx_export import export_onnx

    out = artifact_path(model, routing, shapes, weights, block_size)
    quantization = None if weights == "fp32" else (weights, WEIGHT_SCHEMES[weights].symmetric, block_size, "int8")
    try:
        manifest = load_manifest(out, verify_files=False)
        q = manifest.quantization
        if (manifest.shapes == shapes and manifest.routing == routing
                and (q and (q["scheme"], q["symmetric"], q["block_size"], q.get("activations"))) == quantization
                and manifest.source == str(model.checkpoint.resolve())):
            return out
    except ManifestError:
        pass
    say(f"exporting {out.name}")
    return export_onnx(model.checkpoint, out, dtype=shapes.dtype, batch=shapes.batch,
                       prefill_chunk=shapes.prefill_chunks, cache_slots=shapes.cache_slots, routing=routing,
                       weights="float" if weights == "fp32" else weights, block_size=block_size,
                       kv_dtype=shapes.kv_dtype)


def folder_bytes(folder: Path, suffixes: tuple[str, ...]) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.endswith(suffixes))


def main() -> None:
    spec = json.loads(sys.argv[1])
    say = lambda line: print(f"{PROGRESS}{line}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        model = bench_model(spec["model"], spec["layers"], Path(spec["work_dir"]))
        if spec["artifact"] is None:
            write_checkpoint_if_stale(model, say)
        else:
            routing, shapes, weights, block = spec["artifact"]
            export_if_stale(model, routing, StepShapes.from_dict(shapes), say, weights, block)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
