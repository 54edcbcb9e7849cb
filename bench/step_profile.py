"""Where a step's time goes: ONNX Runtime's own per-node profile of prefill chunks and decode steps.

    python3 -m mixtral_export.bench.step_profile ARTIFACT [--chunks 3] [--decodes 8] [--threads N]

Opens the artifact's graph as OrtBackend does (same session options), with ORT's profiler on,
runs `chunks` full prefill chunks and `decodes` single-token steps on random ids at positions
0.., and prints per phase the milliseconds per step spent in each operator type (the kernel
time ORT records per node), largest first. The first of each is a warm-up and left out.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from mixtral_export.artifact.contract import NO_POSITION, layer_caches
from mixtral_export.artifact.manifest import load_manifest
from mixtral_export.runtimes.ort import session_options, usable_cores


def profile(artifact: Path, chunks: int, decodes: int, threads: int) -> dict[str, dict[str, float]]:
    import onnxruntime as ort

    manifest = load_manifest(artifact, verify_files=False)
    shapes = manifest.shapes
    options = session_options(threads, spin=False)
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as scratch:
        options.profile_file_prefix = str(Path(scratch) / "step")
        session = ort.InferenceSession(str(manifest.graph_path()), options, providers=["CPUExecutionProvider"])
        cache = np.zeros(shapes.cache_shape(), np.float32)  # (L, B, Hkv, S, D)
        slots = np.full((shapes.batch, shapes.cache_slots), NO_POSITION, np.int64)  # (B, S)
        rng = np.random.default_rng(0)
        phases, position = [], 0
        for phase, count, t in (("prefill", chunks + 1, shapes.prefill_chunk), ("decode", decodes + 1, 1)):
            for _ in range(count):
                ids = rng.integers(3, shapes.vocab_size, (shapes.batch, t))  # (B, T)
                pos = np.arange(position, position + t, dtype=np.int64)[None].repeat(shapes.batch, 0)  # (B, T)
                session.run(None, {"input_ids": ids, "positions": pos, "cache_positions": slots,
                                   **layer_caches(cache, cache)})
                phases.append(phase)
                position = (position + t) % (shapes.cache_slots - shapes.prefill_chunk)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    out: dict[str, dict[str, float]] = {"prefill": defaultdict(float), "decode": defaultdict(float)}
    seen = {"prefill": -1, "decode": -1}  # the first run of each phase is a warm-up
    for run, phase in zip(runs, phases):
        seen[phase] += 1
        if seen[phase] == 0:
            continue
        out[phase]["(step)"] += run["dur"] / 1e3
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and run["ts"] <= e["ts"] <= run["ts"] + run["dur"]:
                out[phase][e["args"]["op_name"]] += e["dur"] / 1e3
    return {phase: {op: ms / max(seen[phase], 1) for op, ms in sorted(ops.items(), key=lambda kv: -kv[1])}
            for phase, ops in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--decodes", type=int, default=8)
    parser.add_argument("--threads", type=int, default=usable_cores())
    args = parser.parse_args()
    result = profile(args.artifact, args.chunks, args.decodes, args.threads)
    for phase, ops in result.items():
        print(f"{phase}: " + ", ".join(f"{op} {ms:.1f} ms" for op, ms in list(ops.items())[:8]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
