"""llama.cpp on the steps bench/quant_fidelity.py measured ours on: f32 against ours, quantized against its f32.

    python3 -m mixtral_export.bench.quant_fidelity FLOAT_ART INT8_ART INT4_ART --save-reference REF.npz
    python3 -m mixtral_export.bench.llama_fidelity REF.npz GGUF_F32 [GGUF_Q8_0 GGUF_Q4_0 ...] [--threads 2]

REF.npz holds the prompts, our fp32 ORT artifact's greedy continuation and its teacher-forced
logits. llama.cpp's f32 file (same checkpoint, bench/gguf.py) generates greedily from the same
prompts (are its tokens ours?) and is teacher-forced through our continuation (how far are its
logits from ours?). Each quantized file is teacher-forced through the same continuation and
reported against llama.cpp's own f32 with verify's measures (top-1 agreement, mean and p99 KL of
the next-token distribution, first greedy divergence), as quant_fidelity.py reports ours against
our fp32: the same prompts and steps on both sides.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mixtral_export.bench.llama_runner import LlamaCpp
from mixtral_export.runtimes.verify import first_divergence, quantization_cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("f32", type=Path)
    parser.add_argument("quantized", type=Path, nargs="*")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    with np.load(args.reference) as ref:
        prompts, continuation, ours = ref["prompts"].tolist(), ref["continuation"].tolist(), list(ref["logits"])
    steps = len(continuation[0])
    n_ctx = max(map(len, prompts)) + steps + 1

    def opened(path: Path) -> LlamaCpp:
        return LlamaCpp(path, args.threads, n_ctx)

    llama = opened(args.f32)
    tokens = llama.greedy(prompts, steps)
    forced = llama.teacher_forced(prompts, continuation)
    llama.close()
    same = sum(a == b for x, y in zip(tokens, continuation) for a, b in zip(x, y))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(forced, ours))
    scale = max(float(np.abs(b).max()) for b in ours)
    f32 = {"greedy_tokens_equal": same, "greedy_tokens": steps * len(prompts),
           "first_divergence": [first_divergence(a, b) for a, b in zip(tokens, continuation)],
           "logits_max_abs_diff": diff, "logits_max_abs": scale}
    print(f"{args.f32.name} vs ours (fp32 ORT): greedy tokens {same}/{steps * len(prompts)} equal, teacher-forced "
          f"logits max abs diff {diff:.2e} (logits up to {scale:.1f})", flush=True)
    report = []
    for path in args.quantized:
        llama = opened(path)
        cost = quantization_cost(path.name, "llama.cpp f32", llama.teacher_forced(prompts, continuation), forced,
                                 [first_divergence(a, b) for a, b in zip(llama.greedy(prompts, steps), tokens)])
        llama.close()
        print(f"{path.name}: top-1 {cost.top1_agreement:.1%}, KL mean {cost.kl_mean:.2e}, p99 {cost.kl_p99:.2e}, "
              f"greedy diverges at {cost.first_divergence}", flush=True)
        report.append({"gguf": str(path), **{k: v for k, v in vars(cost).items() if k not in ("runtime", "against")}})
    print(json.dumps({"prompts": len(prompts), "steps": steps, "f32_vs_ours": f32, "results": report}))


if __name__ == "__main__":
    main()
