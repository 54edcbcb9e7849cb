"""What int8/int4 weights cost on a model too big to verify with eager: quantized ORT artifacts vs the float one.

    python3 -m mixtral_export.bench.quant_fidelity FLOAT_ARTIFACT QUANTIZED_ARTIFACT... [--prompts 2] [--steps 32]
                                    [--save-reference REF.npz]

`verify` on a quantized artifact needs eager twice (dequantized and float weights) beside ORT: three
copies of the weights, too many for a mixtral-shaped model on a 24 GiB machine. This opens only ONNX
Runtime artifacts of the same checkpoint, one at a time: the float one generates greedy
continuations of random prompts, every artifact is teacher-forced through them, and each
quantized one is reported against the float one with verify's own measures (top-1 agreement, mean
and p99 KL of the next-token distribution, first greedy divergence). --save-reference keeps the prompts, the float artifact's greedy continuation and its
teacher-forced logits, so llama.cpp is measured on the same steps (bench/llama_fidelity.py), and
later artifacts too: FLOAT_ARTIFACT may be such a REF.npz (then the float artifact, 12.7 GB at 2
mixtral-shaped layers, need not stay on disk).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mixtral_export.runtimes.load import open_backend
from mixtral_export.runtimes.verify import first_divergence, greedy, quantization_cost, teacher_forced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("float_artifact", type=Path, help="the float artifact, or a REF.npz saved from it")
    parser.add_argument("quantized", type=Path, nargs="+")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=24)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--save-reference", type=Path, help="write prompts, continuation and fp32 logits here (.npz)")
    args = parser.parse_args()

    if args.float_artifact.suffix == ".npz":
        prompts, continuation, reference = load_reference(args.float_artifact)
        args.prompts, args.prompt_length, args.steps = len(prompts), len(prompts[0]), len(continuation[0])
    else:
        backend, manifest = open_backend(args.float_artifact, "ort")
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, manifest.shapes.vocab_size, args.prompt_length).tolist()
                   for _ in range(args.prompts)]
        continuation = greedy(backend, prompts, args.steps)
        reference = teacher_forced(backend, prompts, continuation)
        if args.save_reference:
            save_reference(args.save_reference, prompts, continuation, reference)
        del backend
    report = []
    for artifact in args.quantized:
        backend, manifest = open_backend(artifact, "ort")
        q = manifest.quantization or {}
        cost = quantization_cost(str(artifact.name), "fp32 ORT", teacher_forced(backend, prompts, continuation),
                                 reference, [first_divergence(a, b) for a, b in
                                             zip(greedy(backend, prompts, args.steps), continuation)])
        del backend
        row = {"artifact": str(artifact), "scheme": q.get("scheme"), "block_size": q.get("block_size"),
               **{k: v for k, v in vars(cost).items() if k not in ("runtime", "against")}}
        print(f"{artifact.name}: top-1 {cost.top1_agreement:.1%}, KL mean {cost.kl_mean:.2e}, p99 {cost.kl_p99:.2e}, "
              f"greedy diverges at {cost.first_divergence}", flush=True)
        report.append(row)
    print(json.dumps({"prompts": len(prompts), "prompt_length": args.prompt_length, "steps": args.steps,
                      "results": report}))


def save_reference(path: Path, prompts: list[list[int]], continuation: list[list[int]],
                   logits: list[np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        np.savez(f, prompts=np.array(prompts), continuation=np.array(continuation),
                 logits=np.stack(logits))  # (P, L), (P, steps), (P, steps, V)
    tmp.replace(path)


def load_reference(path: Path) -> tuple[list[list[int]], list[list[int]], list[np.ndarray]]:
    with np.load(path, allow_pickle=False) as saved:
        return saved["prompts"].tolist(), saved["continuation"].tolist(), list(saved["logits"])


if __name__ == "__main__":
    main()
