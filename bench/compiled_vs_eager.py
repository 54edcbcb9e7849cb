"""Decode speed of the tiny model: eager vs torch.compile (vs AOTInductor), compile costs included.

One process: writes the tiny checkpoint, compiles the compiled backend (first call of each chunk
length timed separately), optionally builds the AOTI artifact (timed), then runs the same greedy
decode on each backend and prints tokens/s and the compiled/eager ratio. `--cold` points Inductor
at an empty cache folder so the compile times are a first build's, not a cache hit's.

    python3 -m mixtral_export.bench.compiled_vs_eager --steps 200 --aoti --cold --threads 1

On a CPU shared with other jobs, pin --threads below the free cores: an OpenMP pool whose
threads get descheduled spins at barriers and runs many times slower than one thread.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def decode_rate(backend, steps: int) -> float:
    """Tokens/s over `steps` greedy decode steps after one prefill chunk (the prefill is not timed)."""
    import numpy as np

    shapes = backend.shapes
    backend.reset()
    ids = np.ones((shapes.batch, shapes.prefill_chunk), dtype=np.int64)
    positions = np.tile(np.arange(shapes.prefill_chunk), (shapes.batch, 1))
    logits = backend.step(ids, positions)
    position = positions[:, -1:]
    start = time.perf_counter()
    for _ in range(steps):
        position = position + 1
        logits = backend.step(logits[:, -1:].argmax(-1), position)
    return shapes.batch * steps / (time.perf_counter() - start)


def measure(folder: Path, device: str = "cpu", steps: int = 200, batch: int = 1, aoti: bool = False) -> dict:
    from mixtral_export.artifact.contract import StepShapes
    from mixtral_export.checkpoint import load_model
    from mixtral_export.artifact.config import MixtralConfig
    from mixtral_export.runtimes.compiled import CompiledBackend
    from mixtral_export.runtimes.eager import EagerBackend

    shapes = StepShapes.for_config(MixtralConfig.from_json(folder), batch=batch, prefill_chunk=16, slide=True)
    model = load_model(folder, attention_window=shapes.attention_window)
    eager = EagerBackend(model, shapes, device)
    compiled = CompiledBackend(load_model(folder, attention_window=shapes.attention_window), shapes, device)
    compiled.warmup()
    import torch

    out = {"device": device, "batch": batch, "steps": steps, "threads": torch.get_num_threads(),
           "compile_mode": compiled.mode,
           "compile_seconds": compiled.compile_seconds, "eager_tokens_per_s": decode_rate(eager, steps),
           "compiled_tokens_per_s": decode_rate(compiled, steps), "compile_count": compiled.compile_count}
    out["compiled_over_eager"] = out["compiled_tokens_per_s"] / out["eager_tokens_per_s"]
    if aoti:
        from mixtral_export.graphs.aoti_export import export_aoti
        from mixtral_export.runtimes.aoti import AotiBackend

        start = time.perf_counter()
        artifact = export_aoti(folder, folder.parent / "aoti", batch=batch, prefill_chunk=16, slide=True,
                               device=device)
        out["aoti_build_seconds"] = time.perf_counter() - start
        out["aoti_tokens_per_s"] = decode_rate(AotiBackend(artifact, device), steps)
        out["aoti_over_eager"] = out["aoti_tokens_per_s"] / out["eager_tokens_per_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--aoti", action="store_true", help="also build and time the AOTI artifact")
    parser.add_argument("--cold", action="store_true", help="compile into an empty Inductor cache")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        if args.cold:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(scratch) / "inductor")
        from mixtral_export.tiny import TINY_CONFIG, random_weights, write_checkpoint

        folder = write_checkpoint(Path(scratch) / "tiny", TINY_CONFIG, random_weights(TINY_CONFIG, 0))
        result = measure(folder, args.device, args.steps, args.batch, args.aoti)
    print(json.dumps(result, indent=2))
    print(f"compiled/eager decode: {result['compiled_over_eager']:.2f}x")


if __name__ == "__main__":
    main()
