"""One measurement in a fresh process, so its peak memory (VmHWM) is its own.

    python3 -m bench.worker SPEC.json RESULT.json      (from the repo root; bench/run.py starts it)

A spec's "runtime" is either "bandwidth" (the machine's memory-copy rate) or a runtime to time:
eager | eager-gather | compiled (the static PyTorch model), ort-dense | ort-gather (an ONNX
artifact on ONNX Runtime), transformers (`MixtralForCausalLM.generate` on the checkpoint) or
llama.cpp (a GGUF file of the checkpoint, bench/gguf.py, run by bench/llama_runner.py). Every
runtime generates greedily from the same random prompts, stamping the clock as each token comes
out: time to first token = prefill + first sample, decode tokens/s = tokens after the first over the
time between the first and the last stamp. Warm-up runs (prefill chunk + 2 tokens) come first and
are not recorded, so compile and first-touch costs stay out of the numbers. The result holds every
sample; bench/run.py pools them over rounds and summarises.
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from mixtral_export.bench.load_memory import peak_rss

# A runtime under test: generate(prompt ids, new tokens) -> (start time, one clock stamp per token).
Generate = Callable[[list[int], int], tuple[float, list[float]]]
OURS = {"eager": "dense", "eager-gather": "gather", "compiled": "dense", "ort-dense": "dense", "ort-gather": "gather"}
RUNTIMES = (*OURS, "transformers", "llama.cpp")


def bandwidth(threads: int, size: int = 1 << 30, repeats: int = 7) -> dict:
    """GB/s over `size`-byte arrays split across `threads` threads (numpy releases the GIL while it works):
    copy counts read + write bytes (as STREAM does); read is an integer max (reads only: a SIMD compare per
    element keeps up with memory, where numpy's float sum is bound by its own arithmetic, ~30% slower here)."""
    src = np.ones(size // 4, dtype=np.float32)  # (n,) touched, so no page faults inside the timing
    dst = np.zeros_like(src)
    parts = list(zip(np.array_split(src, threads), np.array_split(dst, threads)))
    kinds = {"copy": (lambda p: np.copyto(p[1], p[0]), 2 * src.nbytes),
             "read": (lambda p: p[0].view(np.uint32).max(), src.nbytes)}
    with ThreadPoolExecutor(threads) as pool:
        return {kind: rates(lambda: list(pool.map(work, parts)), moved, repeats)
                for kind, (work, moved) in kinds.items()}


def rates(work: Callable[[], object], nbytes: int, repeats: int) -> list[float]:
    """GB/s of `repeats` timed calls of `work`, which moves `nbytes`; one untimed call first warms
    pools, caches and prepacked weights."""
    work()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        out.append(nbytes / (time.perf_counter() - start) / 1e9)
    return out


def ours(spec: dict) -> tuple[Generate, dict]:
    """A backend of this repo behind the shared generation loop."""
    from mixtral_export.runtimes.generate import generate
    from mixtral_export.runtimes.requests import GenerationConfig

    runtime, info = spec["runtime"], {}
    if runtime.startswith("ort"):
        from mixtral_export.runtimes.ort import OrtBackend

        backend = OrtBackend(spec["artifact"], threads=spec["threads"], verify_files=False, spin=spec["ort_spin"])
    else:
        import torch

        from mixtral_export.artifact.contract import StepShapes
        from mixtral_export.checkpoint import load_model

        torch.set_num_threads(spec["threads"])
        shapes = StepShapes.from_dict(spec["shapes"])
        model = load_model(spec["checkpoint"], dtype=shapes.dtype, attention_window=shapes.attention_window,
                           routing=OURS[runtime])
        if runtime == "compiled":
            from mixtral_export.runtimes.compiled import CompiledBackend

            backend = CompiledBackend(model, shapes)
            backend.warmup()
            info["compile_seconds"] = sum(backend.compile_seconds.values())
        else:
            from mixtral_export.runtimes.eager import EagerBackend

            backend = EagerBackend(model, shapes)

    def run(prompt: list[int], new_tokens: int) -> tuple[float, list[float]]:
        stamps: list[float] = []
        config = GenerationConfig(max_new_tokens=new_tokens)  # greedy, no EOS: always new_tokens tokens
        start = time.perf_counter()
        generate(backend, [prompt], config, on_token=lambda event: stamps.append(time.perf_counter()))
        return start, stamps

    return run, info


def transformers(spec: dict) -> tuple[Generate, dict]:
    """The reference: MixtralForCausalLM (fp32, its default attention) and its own generate."""
    import torch
    from transformers import MixtralForCausalLM, StoppingCriteria, StoppingCriteriaList
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(spec["threads"])
    model = MixtralForCausalLM.from_pretrained(spec["checkpoint"], dtype=torch.float32).eval()

    class Stamp(StoppingCriteria):
        """Called once per generated token, right after it is appended: the clock, never a stop."""

        def __init__(self, stamps: list[float]):
            self.stamps = stamps

        def __call__(self, input_ids, scores, **kwargs):
            self.stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def run(prompt: list[int], new_tokens: int) -> tuple[float, list[float]]:
        stamps: list[float] = []
        ids = torch.tensor([prompt])  # (1, P)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
                           stopping_criteria=StoppingCriteriaList([Stamp(stamps)]))
        return start, stamps

    return run, {"attention": model.config._attn_implementation}


def llama_cpp(spec: dict) -> tuple[Generate, dict]:
    """llama.cpp on the spec's GGUF file, a fresh context (empty KV cache) for every generation."""
    from mixtral_export.bench.llama_runner import LlamaCpp

    kv = spec.get("llama_kv", "float32")
    llama = LlamaCpp(Path(spec["artifact"]), spec["threads"], n_ctx=spec["llama_context"], kv=kv)  # run.py's llama_context

    def run(prompt: list[int], new_tokens: int) -> tuple[float, list[float]]:
        stamps: list[float] = []
        with llama.context() as ctx:
            start = time.perf_counter()
            llama.generate(ctx, prompt, new_tokens, on_token=lambda token: stamps.append(time.perf_counter()))
        return start, stamps

    return run, {"gguf_type": spec["weights"], "kv_type": {"int8": "q8_0", "float16": "f16"}.get(kv, "f32")}


def time_generation(run: Generate, spec: dict) -> list[dict]:
    """Per context length, one sample per repeat: time to first token, decode tokens/s; every step's ms."""
    rng = np.random.default_rng(spec["seed"])
    steps, vocab = spec["decode_steps"], spec["vocab_size"]
    for _ in range(spec["warmup"]):
        for length in spec.get("prefill_chunks") or [spec["prefill_chunk"]]:  # every prefill T the artifact runs
            run(rng.integers(3, vocab, size=length).tolist(), 3)
    out = []
    for context in spec["contexts"]:
        prompt = rng.integers(3, vocab, size=context).tolist()
        ttft, decode, step_ms = [], [], []
        for _ in range(spec["repeats"]):
            start, stamps = run(prompt, steps + 1)
            if len(stamps) != steps + 1:
                raise RuntimeError(f"{spec['runtime']}: {len(stamps)} tokens came out, expected {steps + 1}")
            ttft.append(stamps[0] - start)
            decode.append(steps / (stamps[-1] - stamps[0]))
            step_ms.extend(float(ms) for ms in 1e3 * np.diff(stamps))
        out.append({"context": context, "ttft_s": ttft, "decode_tokens_per_s": decode, "decode_step_ms": step_ms})
    return out


def measure(spec: dict) -> dict:
    if spec["runtime"] == "bandwidth":
        return {"threads": spec["threads"], "single_thread": bandwidth(1), "all_threads": bandwidth(spec["threads"]),
                "peak_rss_bytes": peak_rss()}
    if spec["runtime"] not in RUNTIMES:
        raise ValueError(f"unknown runtime {spec['runtime']!r} (one of {', '.join(RUNTIMES)})")
    load_avg = [os.getloadavg()[0]]
    before = peak_rss()
    start = time.perf_counter()
    run, info = {"transformers": transformers, "llama.cpp": llama_cpp}.get(spec["runtime"], ours)(spec)
    result = {**info, "load_seconds": time.perf_counter() - start, "peak_rss_at_start_bytes": before,
              "peak_rss_after_load_bytes": peak_rss()}
    result["contexts"] = time_generation(run, spec)
    load_avg.append(os.getloadavg()[0])
    return {**result, "peak_rss_bytes": peak_rss(), "load_average": load_avg}


def main() -> None:
    spec_path, result_path = sys.argv[1:3]
    spec = json.loads(Path(spec_path).read_text())
    Path(result_path).write_text(json.dumps(measure(spec), indent=2) + "\n")


if __name__ == "__main__":
    main()
