"""The engine in process, without HTTP: decoders riding along in prefill steps or sitting them out,
and one request at a time (max_rows=1, the serialized baseline), interleaved over one ORT backend.

All rows stay busy with mixed requests submitted at once, so newcomers prefill while others decode.
Reported per mode: generated tok/s (median over rounds) and the gap between a request's consecutive
tokens p50/p99 (riding along, a decoder gets a token from every prefill step instead of waiting).
Set against bench/serve_load.py, it separates the engine's speedup from the HTTP layer's cost.

    python3 -m mixtral_export.bench.engine_load out/tiny-b4 --requests 64 --rounds 4 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from mixtral_export.bench.serve_load import percentile, workload
from mixtral_export.runtimes.engine import Engine
from mixtral_export.runtimes.load import open_backend
from mixtral_export.runtimes.requests import GenerationConfig


def measure(engine: Engine, requests: list[tuple[list[int], int]]) -> tuple[float, list[float]]:
    """tok/s and every gap between consecutive tokens of a request, stepping on this thread."""
    submitted = [engine.submit(prompt, GenerationConfig(max_new_tokens=new), index=n)
                 for n, (prompt, new) in enumerate(requests)]
    last: dict[int, float] = {}
    gaps, tokens, started = [], 0, time.perf_counter()
    for event in engine.drive(submitted):
        now = time.perf_counter()
        if event.index in last:
            gaps.append(now - last[event.index])
        last[event.index] = now
        tokens += 1
    return tokens / (time.perf_counter() - started), gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    backend, manifest = open_backend(args.artifact, "ort", threads=args.threads)
    requests = workload(args.requests, manifest.shapes.vocab_size, (4, 48), (8, 64), 0)
    modes = {"ride along": dict(ride_along=True), "sit out": dict(ride_along=False),
             "one row (serialized)": dict(max_rows=1)}
    rates = {mode: [] for mode in modes}
    gaps = {mode: [] for mode in modes}
    for round_ in range(args.rounds):
        for mode in (list(modes) if round_ % 2 == 0 else list(modes)[::-1]):
            rate, seen = measure(Engine(backend, **modes[mode]), requests)
            rates[mode].append(rate)
            gaps[mode] += seen
    base = statistics.median(rates["one row (serialized)"])
    for mode in modes:
        rate = statistics.median(rates[mode])
        print(f"{mode:21}: {rate:7.1f} tok/s (median of {args.rounds}, {rate / base:.2f}x serialized), gap "
              f"between a request's tokens p50 {percentile(gaps[mode], 50) * 1e3:.2f} ms, "
              f"p99 {percentile(gaps[mode], 99) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
