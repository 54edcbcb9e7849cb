"""Benchmark every runtime against transformers' `generate` and against the machine's memory bandwidth.

    mixtral-export bench tiny --json out/bench/tiny.json --plot out/bench/tiny.png
    mixtral-export bench mixtral-shaped --layers 1 --decode-steps 8 --repeats 3

(CI does not run it.) The steps:

1. the model: `tiny`, `mixtral-shaped` (Mixtral 8x7B dims, `--layers` random fp32 layers) or a
   checkpoint folder (bench/models.py); the ONNX artifacts it needs, dense and gathered routing, one
   per cache size, prefill chunk and quantization block (lists: A/B in one run), exported once into
   the work folder and reused; with llama.cpp in the run and no cache size given, the ring is the
   smallest power of two that holds llama.cpp's context (equal KV capacity, `equal_capacity`);
2. the machine's memory-copy bandwidth, in its own process (bench/worker.py);
3. each runtime in its own process, one after another, so its peak resident memory (VmHWM) is its
   own and two models never share the RAM: warm-up, then per context length `repeats` greedy
   generations of `decode_steps` + 1 tokens from the same random prompt;
4. per runtime and context: decode tokens/s over transformers' and over the bandwidth bound
   (bench/roofline.py), and gathered over dense routing.

`weights` adds precision as a dimension: ort-gather runs once per entry (fp32, int8, int4: one
artifact each, `export --weights`), its bytes per token and bound counted at that precision.
`gguf` does the same for the llama.cpp runtime (f32, q8_0, q4_0, q4_k_m: one GGUF file each, made
by llama.cpp's converter and quantizer, bench/gguf.py), its bytes per token read from the file.
`block_size` quantizes ours once per entry (default: each scheme's, graphs/contract.py).

Numbers are medians with min/max over all repeats. On a shared machine another job's burst can
slow one runtime and not the next: `rounds` > 1 runs steps 2-3 again, interleaved (A B C A B C),
and pools the samples, so a burst spreads over all runtimes instead of skewing one ratio. Each
worker also records the 1-minute load average before and after it, so a noisy run shows. The
bound's bandwidth is the best median of the probes (copy, read-only max; one thread or all).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable


from mixtral_export.bench.gguf import TYPES as GGUF_TYPES
from mixtral_export.bench.gguf import decode_weight_bytes, gguf_path
from mixtral_export.bench.models import BenchError, BenchModel, artifact_path, bench_model, build, folder_bytes
from mixtral_export.bench.roofline import WEIGHTS
from mixtral_export.bench.summary import merge, pooled_bandwidth, summarise
from mixtral_export.bench.worker import OURS, RUNTIMES
from mixtral_export.artifact.contract import DEFAULT_QUANT_BLOCK, KV_DTYPES, default_block_size

LLAMA_KV_NAMES = {"float32": "f32", "float16": "f16", "int8": "q8_0"}  # our KV types as llama.cpp's --cache-type-k/v
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
    prefill_chunk: tuple[int | tuple[int, ...], ...] = (16,)  # one artifact per value; a tuple: one serving each
    cache_slots: tuple[int, ...] | None = None  # one artifact per value; None = llama.cpp's capacity or the config's
    kv_dtype: tuple[str, ...] = ("float32",)  # the ONNX runtimes' KV cache types, one artifact each (export --kv-dtype)
    threads: int | None = None  # None = the usable cores
    work_dir: Path = Path("out/bench")  # resolved against the caller's folder
    seed: int = 0
    timeout: float | None = None  # seconds per worker
    rounds: int = 1  # interleaved passes over all runtimes, samples pooled
    weights: tuple[str, ...] = ("fp32",)  # ort-gather once per precision (bench/roofline.py WEIGHTS)
    block_size: tuple[int, ...] | None = None  # int8/int4 quantization block, one artifact each; None = scheme's
    ort_spin: bool = False  # OrtBackend's default; True lets ORT's threads spin between ops, as OpenMP's do
    gguf: tuple[str, ...] = ("f32",)  # llama.cpp once per GGUF type (bench/gguf.py TYPES)
    llama_converter: Path | None = None  # llama.cpp's convert_hf_to_gguf.py; None = $MIXTRAL_EXPORT_LLAMA_CONVERTER

    def resolved(self) -> "BenchOptions":
        contexts, steps, repeats = DEFAULTS.get(self.model, OTHER_DEFAULTS)
        return BenchOptions(**{**asdict(self), "contexts": tuple(self.contexts or contexts),
                               "decode_steps": self.decode_steps or steps, "repeats": self.repeats or repeats,
                               "threads": self.threads or len(os.sched_getaffinity(0)),
                               "work_dir": Path(self.work_dir).absolute(),  # the workers' own folder may differ
                               "prefill_chunk": as_tuple(self.prefill_chunk),
                               "block_size": as_tuple(self.block_size) if self.block_size else None})

    @property
    def longest_chunk(self) -> int:
        """The longest prefill chunk of any artifact in the run."""
        return max(max(as_tuple(p)) for p in self.prefill_chunk)

    @property
    def llama_context(self) -> int:
        """The KV cells llama.cpp is given: the longest prompt (or warm-up chunk) plus the new tokens."""
        return max(*self.contexts, self.longest_chunk) + self.decode_steps + 1


def as_tuple(value: int | tuple[int, ...]) -> tuple[int, ...]:
    return (value,) if isinstance(value, int) else tuple(value)


def equal_capacity(options: BenchOptions) -> tuple[int | None, ...]:
    """Our ring sizes: the ones asked for; with llama.cpp in the run and none asked for, the smallest power
    of two that holds llama.cpp's context, so both read a KV cache of the same order each decode step (a
    ring of the default 4096 fp32 slots is 64 MiB a token at 2 layers, 6-10% of an int8/int4 step)."""
    if options.cache_slots:
        return options.cache_slots
    if "llama.cpp" in options.runtimes:
        return (1 << (options.llama_context - 1).bit_length(),)
    return (None,)


def run_bench(options: BenchOptions, say: Callable[[str], None] = lambda line: None) -> dict:
    """Prepare, measure every runtime in its own process, and return the report (JSON-ready)."""
    from mixtral_export.artifact.contract import StepShapes

    options = options.resolved()
    unknown = [r for r in options.runtimes if r not in RUNTIMES]
    if unknown or not options.runtimes:
        raise BenchError(f"unknown runtime {', '.join(unknown) or '(none)'} (one of {', '.join(RUNTIMES)})")
    bad = [w for w in options.weights if w not in WEIGHTS]
    if bad or not options.weights:
        raise BenchError(f"unknown weights {', '.join(bad) or '(none)'} (one of {', '.join(WEIGHTS)})")
    if options.weights != ("fp32",) and "ort-gather" not in options.runtimes:
        raise BenchError("--weights int8/int4 apply to ort-gather; add it to --runtimes")
    bad = [t for t in options.gguf if t not in GGUF_TYPES]
    if bad or not options.gguf:
        raise BenchError(f"unknown GGUF type {', '.join(bad) or '(none)'} (one of {', '.join(GGUF_TYPES)})")
    if options.gguf != ("f32",) and "llama.cpp" not in options.runtimes:
        raise BenchError("--gguf types apply to llama.cpp; add it to --runtimes")
    options.work_dir.mkdir(parents=True, exist_ok=True)
    model = bench_model(options.model, options.layers, options.work_dir)
    bad = [k for k in options.kv_dtype if k not in KV_DTYPES]
    if bad or not options.kv_dtype:
        raise BenchError(f"unknown KV cache type {', '.join(bad) or '(none)'} (one of {', '.join(KV_DTYPES)})")
    shapes = [StepShapes.for_config(model.config, batch=1, prefill_chunk=p, cache_slots=s, span_axis=True, kv_dtype=k)
              for s in equal_capacity(options) for p in options.prefill_chunk for k in options.kv_dtype]
    check_contexts(options, model, shapes)
    runtimes = list(options.runtimes)
    precisions = {r: {"ort-gather": options.weights, "llama.cpp": options.gguf}.get(r, ("fp32",)) for r in runtimes}
    variants = {r: [(w, b) for w in precisions[r]  # (weights, block): ours quantized once per block size
                    for b in ((options.block_size or (default_block_size(w),)) if w in WEIGHTS and w != "fp32"
                              else (None,))]
                for r in runtimes}
    artifacts = [(OURS[r], s, w, b or DEFAULT_QUANT_BLOCK) for r in runtimes if r.startswith("ort") for s in shapes
                 for w, b in variants[r]]
    build(options.model, options.layers, options.work_dir, artifacts, say)
    for kind in precisions.get("llama.cpp", ()):
        build_gguf(options, model, kind, say)

    def artifact(runtime: str, s, w: str, b: int | None) -> Path | None:
        if runtime.startswith("ort"):
            return artifact_path(model, OURS[runtime], s, w, b)
        return gguf_path(model.folder, w) if runtime == "llama.cpp" else None

    jobs = [job(options, model, runtime, s, artifact(runtime, s, w, b), w, b)
            for runtime in runtimes for s in runs_on(runtime, shapes) for w, b in variants[runtime]]
    probes: list[dict] = []
    results: list[list[dict]] = [[] for _ in jobs]
    for n in range(options.rounds):
        suffix = f" (round {n + 1} of {options.rounds})" if options.rounds > 1 else ""
        say(f"measuring the memory bandwidth{suffix}")
        probes.append(run_worker({"runtime": "bandwidth", "threads": options.threads}, options, say))
        for spec, found in zip(jobs, results):
            say(f"measuring {spec['label']}{suffix}")
            found.append(run_worker(spec, options, say))
    settings = {**asdict(options), "work_dir": str(options.work_dir), "batch": 1}
    runs = [merge(spec, found) for spec, found in zip(jobs, results)]
    return summarise(settings, model, pooled_bandwidth(probes), runs)


def runs_on(runtime: str, shapes: list) -> list:
    """The shapes a runtime runs once each: ONNX Runtime every one (ring size, chunk, KV type), the
    other of ours only those with the weights' cache type, llama.cpp one per KV type (at its own
    capacity, llama_context), transformers once (None)."""
    if runtime == "llama.cpp":
        first: dict = {}
        for s in shapes:
            first.setdefault(s.cache_dtype, s)
        return list(first.values())
    return [s for s in shapes if runtime.startswith("ort") or s.kv_dtype is None] if runtime in OURS else [None]


def check_contexts(options: BenchOptions, model: BenchModel, shapes: list) -> None:
    longest = max(options.contexts) + options.decode_steps + 1
    limits = [model.config.max_position_embeddings] + [s.max_positions for s in shapes if s.max_positions]
    if min(limits) < longest or min(options.contexts) < 1:
        raise BenchError(f"contexts up to {max(options.contexts)} plus {options.decode_steps + 1} new tokens "
                         f"need {longest} positions; this model and cache serve {min(limits)}")


def build_gguf(options: BenchOptions, model: BenchModel, kind: str, say: Callable[[str], None]) -> None:
    """bench/gguf.py in a child process (llama.cpp's converter and quantizer hold gigabytes while they work)."""
    command = [sys.executable, "-m", "mixtral_export.bench.gguf", str(model.checkpoint), str(model.folder), kind,
               "--threads", str(options.threads)]
    if options.llama_converter is not None:
        command += ["--converter", str(options.llama_converter)]
    last = ""
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as child:
        for line in child.stderr:
            if line.startswith("bench: "):
                say(line.removeprefix("bench: ").rstrip())
            elif line.strip():
                last = line.strip()
    if child.returncode != 0:
        raise BenchError(last.removeprefix("error: ") or f"making the {kind} GGUF failed: exit code {child.returncode}")


def job(options: BenchOptions, model: BenchModel, runtime: str, shapes, artifact: Path | None,
        weights: str = "fp32", block: int | None = None) -> dict:
    """A worker spec: what to load and how to time it; its label names what varies within the run."""
    routing = OURS.get(runtime, "gather")  # transformers runs only the routed experts
    label = runtime
    llama_kv = "float32"
    if runtime == "llama.cpp":  # its cache type follows the shapes' (q8_0 for int8); its capacity is its own
        llama_kv = shapes.cache_dtype if shapes is not None else "float32"
        label += f" kv {LLAMA_KV_NAMES[llama_kv]}" if len(options.kv_dtype) > 1 else ""
        shapes = None
    if shapes is not None and len(options.cache_slots or ()) > 1:
        label += f" S={shapes.cache_slots}"
    if shapes is not None and len(options.kv_dtype) > 1:
        label += f" kv {shapes.cache_dtype}"
    if shapes is not None and len(options.prefill_chunk) > 1:
        label += f" p{'+'.join(map(str, shapes.prefill_chunks))}"
    if runtime == "llama.cpp" or len(options.weights) > 1 or weights != "fp32":
        label += f" {weights}" if runtime in ("ort-gather", "llama.cpp") else ""
    if block is not None and len(options.block_size or ()) > 1:
        label += f" b{block}"
    size = (artifact.stat().st_size if runtime == "llama.cpp" else folder_bytes(artifact, (".onnx", ".data"))
            if artifact else folder_bytes(model.checkpoint, (".safetensors",)))
    if runtime == "llama.cpp":
        c = model.config
        extra = {"decode_weight_bytes": decode_weight_bytes(artifact, c.vocab_size, c.num_experts_per_tok,
                                                            c.num_local_experts)}
    else:
        extra = {}
    return {"runtime": runtime, "label": label, "routing": routing, "weights": weights,
            "block_size": block or DEFAULT_QUANT_BLOCK,
            "cache_slots": shapes.cache_slots if shapes is not None else None,
            "shapes": shapes.to_dict() if shapes is not None else None,
            "checkpoint": str(model.checkpoint), "artifact": str(artifact) if artifact else None,
            "artifact_bytes": size, "contexts": list(options.contexts), "decode_steps": options.decode_steps,
            "repeats": options.repeats, "warmup": options.warmup, "threads": options.threads,
            "ort_spin": options.ort_spin, "seed": options.seed, "vocab_size": model.config.vocab_size,
            "prefill_chunk": shapes.prefill_chunk if shapes is not None else options.longest_chunk,
            "prefill_chunks": list(shapes.prefill_chunks) if shapes is not None else None,
            "llama_context": options.llama_context, "llama_kv": llama_kv, **extra}


def run_worker(spec: dict, options: BenchOptions, say: Callable[[str], None]) -> dict:
    """bench/worker.py in a fresh interpreter; its result, or {"error": its last line of stderr}."""
    threads = str(options.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    with tempfile.TemporaryDirectory(dir=options.work_dir) as scratch:
        spec_path, result_path = Path(scratch) / "spec.json", Path(scratch) / "result.json"
        spec_path.write_text(json.dumps(spec))
        try:
            done = subprocess.run([sys.executable, "-m", "mixtral_export.bench.worker", str(spec_path), str(result_path)],
                                  env=env, capture_output=True, text=True, timeout=options.timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {options.timeout:g} s"}
        if done.returncode != 0 or not result_path.is_file():
            lines = [line for line in done.stderr.splitlines() if line.strip()] or [f"exit code {done.returncode}"]
            say(f"{spec['runtime']} failed: {lines[-1]}")
            return {"error": lines[-1]}
        return json.loads(result_path.read_text())

