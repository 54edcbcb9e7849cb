"""A mixtral-shaped checkpoint whose fp32 weights are stored as bfloat16: half the disk, same numbers.

    python3 bench/bf16_checkpoint.py OUT_FOLDER --layers 2

bench/models.py's `mixtral-shaped` writes float32 files (12.7 GB at 2 layers). Comparing with
llama.cpp needs that checkpoint, an fp32 ONNX artifact and an f32 GGUF on disk at once; stored as
bf16 the checkpoint takes half. Its config says float32, so every reader (our loader, transformers,
llama.cpp's converter with --outtype f32) upcasts exactly: all of them run the same fp32 weights.
Weights are bench/models.py's (tiny.random_weights' scales), made one tensor at a time so the
process never holds more than the bf16 checkpoint; Mixtral 8x7B's sentencepiece tokenizer (from
mistral-common) goes beside them, since llama.cpp's converter needs one.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mixtral_export.bench.load_memory import MIXTRAL_8X7B
from mixtral_export.artifact.config import MixtralConfig


def main() -> None:
    import mistral_common
    import torch

    from mixtral_export.tiny import random_weights, write_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = MixtralConfig(num_hidden_layers=args.layers, dtype="bfloat16", **MIXTRAL_8X7B)
    out = random_weights(config, args.seed, dtype=torch.bfloat16)
    tokenizer = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    write_checkpoint(args.out, config, out, max_shard_bytes=1 << 30, tokenizer_model=tokenizer)
    path = args.out / "config.json"
    raw = json.loads(path.read_text())
    raw.update({key: "float32" for key in ("dtype", "torch_dtype") if key in raw})
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    print(f"{args.out}: {sum(p.stat().st_size for p in args.out.iterdir()) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
