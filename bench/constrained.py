"""The per-token cost of constrained decoding: a request under a JSON schema's grammar against the
same request unconstrained, interleaved on one ORT backend, for greedy and sampled decoding.

Each round runs every mode once (the order reversed every other round), one request at a time on a
batch-1 artifact (gathered routing by default), decode steps only (prefill timed apart, as generate does). A mode's figure is its
decode milliseconds per token (median over rounds); the ratio is the median of the per-round ratios
constrained / unconstrained, so a burst of another job's load spreads over both. The constrained
step includes everything the grammar costs: the mask, the budget's closing path, and the masked
choice. The model is `tiny` (vocabulary 1000, its own tokenizer) or `mixtral-shaped` (Mixtral 8x7B's
dimensions with `--layers` random layers, vocabulary 32000: Mixtral 8x7B's tokenizer as
mistral-common ships it, `tokenizer.model.v1`, or `--tokenizer FILE`).

`--libraries` instead times the grammar libraries alone on one vocabulary (mistral-common's v3,
Mixtral 8x22B's, by default): the mask and the commit per token along random walks through SCHEMA
(the same walks for each), for llguidance as the engine uses it, llguidance with a maxLength on
every string, and xgrammar when it is installed (its byte-fallback vocabulary type).

    python3 -m mixtral_export.bench.constrained tiny --rounds 5
    python3 -m mixtral_export.bench.constrained mixtral-shaped --layers 1 --rounds 3 --tokens 48
    python3 -m mixtral_export.bench.constrained --libraries --rounds 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
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


def with_max_length(schema, length: int):
    """`schema` with maxLength `length` on every string it declares (at any depth)."""
    if not isinstance(schema, dict):
        return schema
    out = {key: ({k: with_max_length(v, length) for k, v in value.items()} if key == "properties" else
                 with_max_length(value, length)) for key, value in schema.items()}
    return {**out, "maxLength": length} if out.get("type") == "string" else out


def walk_us(start, mask, take, ended, vocab: int, rounds: int, steps: int = 200) -> float:
    """Microseconds of mask + commit per token over `rounds` random walks of at most `steps` tokens
    (seeded: every library walks the same way while they allow the same tokens)."""
    import numpy as np

    from mixtral_export.runtimes.constraint import unpack

    spent, tokens = 0.0, 0
    for round_ in range(rounds):
        rng, state = np.random.default_rng(round_), start()
        for _ in range(steps):
            began = time.perf_counter()
            words = mask(state)
            spent += time.perf_counter() - began
            token = int(rng.choice(np.flatnonzero(unpack(words)[:vocab])))
            began = time.perf_counter()
            take(state, token)
            spent += time.perf_counter() - began
            tokens += 1
            if ended(state):
                break
    return spent * 1e6 / tokens


def libraries(tokenizer_path: Path | None, rounds: int) -> None:
    """Per-token mask + commit of llguidance (as used, and with string bounds) and xgrammar."""
    import json

    import numpy as np
    from llguidance import LLMatcher
    from llguidance.numpy import fill_next_token_bitmask

    from mixtral_export.runtimes.constraint import Grammars
    from mixtral_export.tokenizer import Tokenizer

    if tokenizer_path is None:
        import mistral_common

        tokenizer_path = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
    tokenizer = Tokenizer.from_file(tokenizer_path)
    vocab = tokenizer.vocab_size
    lltokenizer, _ = Grammars(tokenizer, vocab).built()
    words = (vocab + 31) // 32
    load = os.getloadavg()[0]
    results = {}

    def llguidance(grammar):
        buffer = np.zeros((1, words), dtype=np.int32)  # (1, W)

        def mask(matcher):
            fill_next_token_bitmask(matcher, buffer)
            return buffer[0]
        return walk_us(lambda: LLMatcher(lltokenizer, grammar, log_level=0), mask,
                       lambda matcher, token: matcher.consume_token(token), lambda matcher: matcher.is_stopped(),
                       vocab, rounds)

    results["llguidance"] = llguidance(json_grammar(SCHEMA))
    results["llguidance, maxLength 512"] = llguidance(json_grammar(with_max_length(SCHEMA, 512)))
    try:
        import xgrammar
    except ImportError:
        print("xgrammar is not installed: its row is left out")
    else:
        info = xgrammar.TokenizerInfo([tokenizer.sp.id_to_piece(i) for i in range(vocab)],
                                      vocab_type=xgrammar.VocabType.BYTE_FALLBACK, vocab_size=vocab,
                                      stop_token_ids=[tokenizer.eos_id], add_prefix_space=True)
        compiled = xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
        buffer = xgrammar.allocate_token_bitmask(1, vocab)  # (1, W) int32 torch tensor

        def mask(matcher):
            matcher.fill_next_token_bitmask(buffer)
            return buffer[0].numpy()
        results["xgrammar"] = walk_us(lambda: xgrammar.GrammarMatcher(compiled), mask,
                                      lambda matcher, token: matcher.accept_token(token),
                                      lambda matcher: matcher.is_terminated(), vocab, rounds)
    print(f"{tokenizer_path.name}, vocabulary {vocab}, {rounds} random walks, load {load:.1f} -> "
          f"{os.getloadavg()[0]:.1f}")
    for name, us in results.items():
        print(f"{name:26}: {us:7.1f} us/token mask + commit, {us / results['llguidance']:.2f}x llguidance")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="tiny", help="tiny | mixtral-shaped | a checkpoint folder")
    parser.add_argument("--libraries", action="store_true", help="time the grammar libraries alone")
    parser.add_argument("--layers", type=int, default=1, help="mixtral-shaped: random layers")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request at most")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--routing", default="gather", help="gather | dense")
    parser.add_argument("--work-dir", type=Path, default=Path("out/bench"))
    args = parser.parse_args()
    if args.libraries:
        libraries(args.tokenizer, args.rounds)
        return
    model = bench_model(args.model, args.layers, args.work_dir)
    shapes = StepShapes.for_config(model.config, batch=1, prefill_chunk=16, cache_slots=128)
    build(args.model, args.layers, args.work_dir, [(args.routing, shapes, "fp32", 32)], print)
    artifact = export_if_stale(model, args.routing, shapes, print)
    tokenizer = tokenizer_for(args.model, model.checkpoint, args.tokenizer)
    backend, manifest = open_backend(artifact, "ort", threads=args.threads)
    engine = Engine(backend, tokenizer=tokenizer, ride_along=False)
    prompt = tokenizer.encode_chat([{"role": "user", "content": "Describe a person as JSON."}])
    eos = ()  # unconstrained requests run their whole budget; a constrained one ends with its grammar
    load = os.getloadavg()[0]
    for mode in MODES[::2]:  # warm-up: first-call allocations and the grammar tokenizer out of the measurement
        per_token_ms(engine, prompt, mode, 2, eos, 0)
    engine.admission.constrain(prompt, generation_config(eos, max_new_tokens=args.tokens, grammar=json_grammar(SCHEMA)))
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
