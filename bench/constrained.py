"""The per-token cost of constrained decoding: a request under a JSON schema's grammar against the
same request unconstrained, interleaved on one ORT backend, for greedy and sampled decoding.

Each round runs every mode once (the order reversed every other round), one request at a time on a
batch-1 artifact, decode steps only (prefill timed apart, as generate does). A mode's figure is its
decode milliseconds per token (median over rounds); the ratio is the median of the per-round ratios
constrained / unconstrained, so a burst of another job's load spreads over both. The constrained
step includes everything the grammar costs: the mask, the budget's closing path, and the masked
choice. The model is `tiny` (vocabulary 1000, its own tokenizer) or `mixtral-shaped` (Mixtral 8x7B's
dimensions with `--layers` random layers, vocabulary 32000: Mixtral 8x7B's tokenizer as
mistral-common ships it, `tokenizer.model.v1`, or `--tokenizer FILE`).

    python3 -m mixtral_export.bench.constrained tiny --rounds 5
    python3 -m mixtral_export.bench.constrained mixtral-shaped --layers 1 --rounds 3 --tokens 24
"""
from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from mixtral_export.artifact.contract import StepShapes
from mixtral_export.bench.models import BenchError, bench_model, build, export_if_stale
from mixtral_export.runtimes.engine import Engine
from mixtral_export.runtimes.engine_client import result_of
from mixtral_export.runtimes.json_grammar import json_grammar
from mixtral_export.runtimes.load import open_backend
from mixtral_export.runtimes.requests import generation_config

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "number"}},
                "required": ["city", "zip"]}}, "required": ["name", "age", "address"]}
MODES = ("greedy", "greedy + schema", "sampled", "sampled + schema")


def tokenizer_for(model: str, checkpoint: Path, path: Path | None):
    from mixtral_export.tokenizer import Tokenizer

    if path is not None:
        return Tokenizer.from_file(path)
    if (checkpoint / "tokenizer.model").is_file():
        return Tokenizer.from_file(checkpoint)
    try:
        import mistral_common
    except ImportError:
        raise BenchError(f"{model} has no tokenizer: give --tokenizer FILE (or install mistral-common, which "
                         f"ships Mixtral 8x7B's)") from None
    return Tokenizer.from_file(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1")


def per_token_ms(engine: Engine, prompt: list[int], mode: str, tokens: int, eos: tuple[int, ...], seed: int) -> float:
    """Decode milliseconds per token of one request in `mode`."""
    options = dict(max_new_tokens=tokens, temperature=1.0 if mode.startswith("sampled") else 0.0, seed=seed)
    if mode.endswith("schema"):
        options["grammar"] = json_grammar(SCHEMA)
    handle = engine.submit(prompt, generation_config(eos, **options))
    for _ in engine.drive([handle]):
        pass
    result = result_of([handle])
    return result.decode_seconds * 1e3 / max(result.decode_tokens, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="tiny | mixtral-shaped | a checkpoint folder")
    parser.add_argument("--layers", type=int, default=1, help="mixtral-shaped: random layers")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request at most")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--work-dir", type=Path, default=Path("out/bench"))
    args = parser.parse_args()
    model = bench_model(args.model, args.layers, args.work_dir)
    shapes = StepShapes.for_config(model.config, batch=1, prefill_chunk=16, cache_slots=128)
    build(args.model, args.layers, args.work_dir, [("dense", shapes, "fp32", 32)], print)
    artifact = export_if_stale(model, "dense", shapes, print)
    tokenizer = tokenizer_for(args.model, model.checkpoint, args.tokenizer)
    backend, manifest = open_backend(artifact, "ort", threads=args.threads)
    engine = Engine(backend, tokenizer=tokenizer, ride_along=False)
    prompt = tokenizer.encode_chat([{"role": "user", "content": "Describe a person as JSON."}])
    eos = ()  # unconstrained requests run their whole budget; a constrained one ends with its grammar
    load = os.getloadavg()[0]
    for mode in MODES:  # warm-up: first-call allocations and the grammar tokenizer out of the measurement
        per_token_ms(engine, prompt, mode, args.tokens, eos, 0)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        for mode in (MODES if round_ % 2 == 0 else MODES[::-1]):
            times[mode].append(per_token_ms(engine, prompt, mode, args.tokens, eos, round_))
    print(f"{model.name}, vocabulary {manifest.shapes.vocab_size}, {args.tokens} new tokens at most, "
          f"{args.rounds} rounds, load {load:.1f} -> {os.getloadavg()[0]:.1f}")
    for mode in MODES:
        base = mode.removesuffix(" + schema")
        ratio = statistics.median(a / b for a, b in zip(times[mode], times[base]))
        print(f"{mode:17}: {statistics.median(times[mode]):8.3f} ms/token "
              f"(min {min(times[mode]):.3f}, max {max(times[mode]):.3f}), {ratio:.2f}x {base}")


if __name__ == "__main__":
    main()
