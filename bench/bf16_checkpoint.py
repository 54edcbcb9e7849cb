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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load_memory import MIXTRAL_8X7B  # noqa: E402
from mixtral_export.config import MixtralConfig  # noqa: E402


def main() -> None:
    import math

    import mistral_common
    import torch

    from mixtral_export.tiny import write_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = MixtralConfig(num_hidden_layers=args.layers, dtype="bfloat16", **MIXTRAL_8X7B)
    gen = torch.Generator().manual_seed(args.seed)
    h, i, v, d = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    nh, nkv = config.num_attention_heads, config.num_key_value_heads

    def normal(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    out = {"model.embed_tokens.weight": normal(v, h, std=1.0), "model.norm.weight": 1.0 + normal(h, std=0.1),
           "lm_head.weight": normal(v, h, std=3.0 / math.sqrt(h))}
    for n in range(config.num_hidden_layers):
        pre = f"model.layers.{n}"
        out[f"{pre}.input_layernorm.weight"] = 1.0 + normal(h, std=0.1)
        out[f"{pre}.post_attention_layernorm.weight"] = 1.0 + normal(h, std=0.1)
        out[f"{pre}.self_attn.q_proj.weight"] = normal(nh * d, h, std=1.5 / math.sqrt(h))
        out[f"{pre}.self_attn.k_proj.weight"] = normal(nkv * d, h, std=1.5 / math.sqrt(h))
        out[f"{pre}.self_attn.v_proj.weight"] = normal(nkv * d, h, std=1.0 / math.sqrt(h))
        out[f"{pre}.self_attn.o_proj.weight"] = normal(h, nh * d, std=0.5 / math.sqrt(nh * d))
        out[f"{pre}.block_sparse_moe.gate.weight"] = normal(config.num_local_experts, h, std=2.0 / math.sqrt(h))
        for e in range(config.num_local_experts):
            out[f"{pre}.block_sparse_moe.experts.{e}.w1.weight"] = normal(i, h, std=1.0 / math.sqrt(h))
            out[f"{pre}.block_sparse_moe.experts.{e}.w3.weight"] = normal(i, h, std=1.0 / math.sqrt(h))
            out[f"{pre}.block_sparse_moe.experts.{e}.w2.weight"] = normal(h, i, std=0.5 / math.sqrt(i))
    tokenizer = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    write_checkpoint(args.out, config, out, max_shard_bytes=1 << 30, tokenizer_model=tokenizer)
    path = args.out / "config.json"
    raw = json.loads(path.read_text())
    raw.update({key: "float32" for key in ("dtype", "torch_dtype") if key in raw})
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    print(f"{args.out}: {sum(p.stat().st_size for p in args.out.iterdir()) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
