"""Benchmark every runtime against transformers' `generate` and against the machine's memory bandwidth.

    python3 bench/run.py tiny --json out/bench/tiny.json --plot out/bench/tiny.png
    python3 bench/run.py mixtral-shaped --layers 1 --decode-steps 8 --repeats 3

(the same as `mixtral-export bench ...`; CI does not run it). The steps:

1. the model: `tiny`, `mixtral-shaped` (Mixtral 8x7B dims, `--layers` random fp32 layers) or a
   checkpoint folder (bench/models.py); the ONNX artifacts it needs, dense and gathered routing, one
   per cache size, exported once into the work folder and reused;
2. the machine's memory-copy bandwidth, in its own process (bench/worker.py);
3. each runtime in its own process, one after another, so its peak resident memory (VmHWM) is its
   own and two models never share the RAM: warm-up, then per context length `repeats` greedy
   generations of `decode_steps` + 1 tokens from the same random prompt;
4. per runtime and context: decode tokens/s over transformers' and over the bandwidth bound
   (bench/roofline.py), and gathered over dense routing.

Numbers are medians with min/max over the repeats. The machine is shared: each worker records the
1-minute load average before and after, so a noisy run shows.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python3 bench/run.py` puts bench/, not the repo, on the path
    sys.path.insert(0, str(REPO))

from bench.models import BenchError, BenchModel, artifact_path, bench_model, build, folder_bytes  # noqa: E402
from bench.roofline import bound_tokens_per_second, decode_bytes  # noqa: E402
from bench.worker import OURS, RUNTIMES  # noqa: E402

DEFAULT_RUNTIMES = ("eager", "ort-dense", "ort-gather", "compiled", "transformers")
# contexts, decode steps, repeats: a few minutes per named model on 2 cores.
DEFAULTS = {"tiny": ((16, 128, 512), 64, 5), "mixtral-shaped": ((16, 128), 8, 3)}
OTHER_DEFAULTS = ((16, 128), 16, 3)


@dataclass(frozen=True)
class BenchOptions:
    model: str  # "tiny" | "mixtral-shaped" | a checkpoint folder
    layers: int = 1  # mixtral-shaped only
    runtimes: tuple[str, ...] = DEFAULT_RUNTIMES
    contexts: tuple[int, ...] | None = None  # prompt lengths; None = the model's defaults
    decode_steps: int | None = None
    repeats: int | None = None
    warmup: int = 1
    prefill_chunk: int = 16
    cache_slots: tuple[int, ...] | None = None  # one artifact per value; None = the config's default
    threads: int | None = None  # None = the usable cores
    work_dir: Path = field(default=REPO / "out" / "bench")
    seed: int = 0
    timeout: float | None = None  # seconds per worker
    ort_spin: bool = True  # ORT's intra-op threads spin between ops, as torch's OpenMP threads do

    def resolved(self) -> "BenchOptions":
        contexts, steps, repeats = DEFAULTS.get(self.model, OTHER_DEFAULTS)
        return BenchOptions(**{**asdict(self), "contexts": tuple(self.contexts or contexts),
                               "decode_steps": self.decode_steps or steps, "repeats": self.repeats or repeats,
                               "threads": self.threads or len(os.sched_getaffinity(0))})


def run_bench(options: BenchOptions, say: Callable[[str], None] = lambda line: None) -> dict:
    """Prepare, measure every runtime in its own process, and return the report (JSON-ready)."""
    from graphs.contract import StepShapes

    options = options.resolved()
    unknown = [r for r in options.runtimes if r not in RUNTIMES]
    if unknown or not options.runtimes:
        raise BenchError(f"unknown runtime {', '.join(unknown) or '(none)'} (one of {', '.join(RUNTIMES)})")
    options.work_dir.mkdir(parents=True, exist_ok=True)
    model = bench_model(options.model, options.layers, options.work_dir)
    slots = options.cache_slots or (None,)
    shapes = [StepShapes.for_config(model.config, batch=1, prefill_chunk=options.prefill_chunk, cache_slots=s)
              for s in slots]
    check_contexts(options, model, shapes)
    runtimes = list(options.runtimes)
    if "compiled" in runtimes and not (REPO / "runtimes" / "compiled.py").is_file():
        say("skipping compiled: runtimes/compiled.py is not there")
        runtimes.remove("compiled")
    artifacts = [(OURS[r], s) for r in runtimes if r.startswith("ort") for s in shapes]
    build(options.model, options.layers, options.work_dir, artifacts, say)
    jobs = [job(options, model, runtime, s, artifact_path(model, OURS[runtime], s) if runtime.startswith("ort")
                else None, len(shapes) > 1) for runtime in runtimes for s in (shapes if runtime in OURS else (None,))]
    say("measuring the memory bandwidth")
    bandwidth = run_worker({"runtime": "bandwidth", "threads": options.threads}, options, say)
    runs = []
    for spec in jobs:
        say(f"measuring {spec['label']}")
        runs.append({**{k: spec[k] for k in ("runtime", "label", "routing", "cache_slots", "artifact",
                                              "artifact_bytes")}, **run_worker(spec, options, say)})
    return report(options, model, bandwidth, runs)


def check_contexts(options: BenchOptions, model: BenchModel, shapes: list) -> None:
    longest = max(options.contexts) + options.decode_steps + 1
    limits = [model.config.max_position_embeddings] + [s.max_positions for s in shapes if s.max_positions]
    if min(limits) < longest or min(options.contexts) < 1:
        raise BenchError(f"contexts up to {max(options.contexts)} plus {options.decode_steps + 1} new tokens "
                         f"need {longest} positions; this model and cache serve {min(limits)}")


def job(options: BenchOptions, model: BenchModel, runtime: str, shapes, artifact: Path | None, many: bool) -> dict:
    """A worker spec: what to load and how to time it."""
    routing = OURS.get(runtime, "gather")  # transformers runs only the routed experts
    label = f"{runtime} S={shapes.cache_slots}" if many and shapes is not None else runtime
    size = folder_bytes(artifact, (".onnx", ".data")) if artifact else folder_bytes(model.checkpoint, (".safetensors",))
    return {"runtime": runtime, "label": label, "routing": routing,
            "cache_slots": shapes.cache_slots if shapes is not None else None,
            "shapes": shapes.to_dict() if shapes is not None else None,
            "checkpoint": str(model.checkpoint), "artifact": str(artifact) if artifact else None,
            "artifact_bytes": size, "contexts": list(options.contexts), "decode_steps": options.decode_steps,
            "repeats": options.repeats, "warmup": options.warmup, "threads": options.threads,
            "ort_spin": options.ort_spin, "seed": options.seed, "vocab_size": model.config.vocab_size,
            "prefill_chunk": options.prefill_chunk}


def run_worker(spec: dict, options: BenchOptions, say: Callable[[str], None]) -> dict:
    """bench/worker.py in a fresh interpreter; its result, or {"error": its last line of stderr}."""
    threads = str(options.threads)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))),
           "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    with tempfile.TemporaryDirectory(dir=options.work_dir) as scratch:
        spec_path, result_path = Path(scratch) / "spec.json", Path(scratch) / "result.json"
        spec_path.write_text(json.dumps(spec))
        try:
            done = subprocess.run([sys.executable, "-m", "bench.worker", str(spec_path), str(result_path)],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=options.timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {options.timeout:g} s"}
        if done.returncode != 0 or not result_path.is_file():
            lines = [line for line in done.stderr.splitlines() if line.strip()] or [f"exit code {done.returncode}"]
            say(f"{spec['runtime']} failed: {lines[-1]}")
            return {"error": lines[-1]}
        return json.loads(result_path.read_text())


def report(options: BenchOptions, model: BenchModel, bandwidth: dict, runs: list[dict]) -> dict:
    """Attach bytes per token, the bandwidth bound and the ratio to transformers to every measurement."""
    limit = (max(bandwidth[k]["copy"]["median"] for k in ("single_thread", "all_threads"))
             if "error" not in bandwidth else None)
    reference = next((r for r in runs if r["runtime"] == "transformers" and "contexts" in r), None)
    for run in runs:
        for point in run.get("contexts", []):
            kv = run["cache_slots"] if run["cache_slots"] is not None else point["context"]
            point["bytes_per_token"] = decode_bytes(model.config, run["routing"], kv)
            decode = point["decode_tokens_per_s"]["median"]
            bound = bound_tokens_per_second(limit, model.config, run["routing"], kv) if limit else None
            point["bound_tokens_per_s"], point["fraction_of_bound"] = bound, decode / bound if bound else None
            ref = next((p["decode_tokens_per_s"]["median"] for p in (reference or {}).get("contexts", [])
                        if p["context"] == point["context"]), None)
            point["vs_transformers"] = decode / ref if ref else None
    return {"model": {"name": model.name, "checkpoint": str(model.checkpoint), "config": model.config.to_dict(),
                      "weights_bytes": folder_bytes(model.checkpoint, (".safetensors",))},
            "settings": {**asdict(options), "work_dir": str(options.work_dir), "batch": 1},
            "machine": {"cpus": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
                        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                        "bandwidth_gbps": bandwidth, "bound_bandwidth_gbps": limit},
            "runs": runs, "gather_over_dense": gather_over_dense(runs)}


def gather_over_dense(runs: list[dict]) -> list[dict]:
    """Decode speedup of gathered over dense routing, per runtime family, cache size and context."""
    pairs = (("ort-gather", "ort-dense"), ("eager-gather", "eager"))
    out = []
    for gather_name, dense_name in pairs:
        for g in (r for r in runs if r["runtime"] == gather_name and "contexts" in r):
            d = next((r for r in runs if r["runtime"] == dense_name and r["cache_slots"] == g["cache_slots"]
                      and "contexts" in r), None)
            for gp, dp in zip(g["contexts"], d["contexts"] if d else []):
                out.append({"gather": gather_name, "dense": dense_name, "cache_slots": g["cache_slots"],
                            "context": gp["context"],
                            "speedup": gp["decode_tokens_per_s"]["median"] / dp["decode_tokens_per_s"]["median"]})
    return out


if __name__ == "__main__":
    from mixtral_export.cli import main

    sys.argv = ["mixtral-export", "bench", *sys.argv[1:]]
    main()
