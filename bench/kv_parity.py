"""How far a narrower KV cache (export --kv-dtype) moves the logits from the same model's wider one.

    python -m mixtral_export.bench.kv_parity BASELINE ARTIFACT [ARTIFACT ...] [--steps N] [--prompt N]

BASELINE and each ARTIFACT are ONNX artifacts of one checkpoint that differ in their cache type.
The baseline generates greedily from random prompts (one per batch row, of different lengths);
then every artifact is fed that same continuation (teacher-forced: runtimes/verify.py) and compared
step by step: max |logit difference|, the fraction of steps whose argmax agrees, and, generating
greedily on its own, the fraction of tokens equal to the baseline's before the first difference.
One artifact is open at a time.
"""
from __future__ import annotations

import argparse
import json

import numpy as np


def compare(baseline: str, artifacts: list[str], steps: int, prompt: int, seed: int = 0) -> list[dict]:
    from mixtral_export.runtimes.generate import generate
    from mixtral_export.runtimes.ort import OrtBackend
    from mixtral_export.runtimes.requests import GenerationConfig
    from mixtral_export.runtimes.sampling import SamplingParams
    from mixtral_export.runtimes.verify import teacher_forced

    backend = OrtBackend(baseline, verify_files=False)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, backend.shapes.vocab_size, prompt // (row + 1)).tolist()
               for row in range(backend.shapes.batch)]  # (B,) prompts of prompt, prompt/2, ... tokens
    config = GenerationConfig(max_new_tokens=steps, sampling=SamplingParams(), eos_token_ids=())
    greedy = [c.token_ids for c in generate(backend, prompts, config).completions]
    reference = teacher_forced(backend, prompts, greedy)  # (steps, V) per row
    del backend
    out = []
    for path in artifacts:
        backend = OrtBackend(path, verify_files=False)
        forced = teacher_forced(backend, prompts, greedy)
        own = [c.token_ids for c in generate(backend, prompts, config).completions]
        same = [next((n for n, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(own, greedy)]
        out.append({"artifact": path, "kv_dtype": backend.shapes.cache_dtype, "steps": steps,
                    "max_abs": max(float(np.abs(a - b).max()) for a, b in zip(forced, reference)),
                    "top1_agreement": float(np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1)
                                                                    for a, b in zip(forced, reference)]))),
                    "greedy_prefix": sum(same) / (steps * len(same)),
                    "logit_scale": max(float(np.abs(r).max()) for r in reference)})
        del backend
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline")
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=40)
    args = parser.parse_args()
    for row in compare(args.baseline, args.artifacts, args.steps, args.prompt):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
