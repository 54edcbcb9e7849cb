"""Peak memory of loading a real-size Mixtral layer: does loading hold one copy of the weights?

Writes a checkpoint with Mixtral 8x7B dimensions (hidden 4096, 8 experts of 14336, vocab 32000)
and N layers of uninitialised bf16 weights, sharded like the real one, then loads it in a fresh
process and reports peak RSS against the weights' size.

    python3 -m mixtral_export.bench.load_memory --layers 1 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIXTRAL_8X7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, num_local_experts=8, num_experts_per_tok=2,
                    sliding_window=None, max_position_embeddings=32768, rope_theta=1e6)


def write(folder: Path, layers: int, dtype: str) -> int:
    import torch

    from mixtral_export.artifact.config import MixtralConfig
    from mixtral_export.tiny import write_checkpoint

    config = MixtralConfig(num_hidden_layers=layers, dtype=dtype, **MIXTRAL_8X7B)
    h, i, v, e = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_local_experts
    kv = config.num_key_value_heads * config.head_dim
    t = {"model.embed_tokens.weight": torch.empty(v, h), "lm_head.weight": torch.empty(v, h),
         "model.norm.weight": torch.empty(h)}
    for n in range(layers):
        p = f"model.layers.{n}"
        t.update({f"{p}.input_layernorm.weight": torch.empty(h), f"{p}.post_attention_layernorm.weight": torch.empty(h),
                  f"{p}.self_attn.q_proj.weight": torch.empty(h, h), f"{p}.self_attn.k_proj.weight": torch.empty(kv, h),
                  f"{p}.self_attn.v_proj.weight": torch.empty(kv, h), f"{p}.self_attn.o_proj.weight": torch.empty(h, h),
                  f"{p}.block_sparse_moe.gate.weight": torch.empty(e, h)})
        for x in range(e):
            t.update({f"{p}.block_sparse_moe.experts.{x}.w1.weight": torch.empty(i, h),
                      f"{p}.block_sparse_moe.experts.{x}.w3.weight": torch.empty(i, h),
                      f"{p}.block_sparse_moe.experts.{x}.w2.weight": torch.empty(h, i)})
    for value in t.values():
        value.zero_()
    write_checkpoint(folder, config, t, max_shard_bytes=1 << 30)
    size = {"float32": 4}.get(dtype, 2)
    return sum(x.numel() for x in t.values()) * size


def peak_rss() -> int:
    """VmHWM: this address space's peak resident set (ru_maxrss would carry over from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def load(folder: str, dtype: str) -> None:
    from mixtral_export.checkpoint import load_model

    start = time.perf_counter()
    model = load_model(folder, dtype=dtype)
    seconds = time.perf_counter() - start
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = peak_rss()
    print(f"{params} {peak} {seconds}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        return load(args.load, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ck"
        on_disk = write(folder, args.layers, args.dtype)
        baseline = subprocess.run([sys.executable, "-c", "from mixtral_export.bench.load_memory import peak_rss; "
                                   "import mixtral_export.checkpoint; print(peak_rss())"],
                                  capture_output=True, text=True, check=True)
        out = subprocess.run([sys.executable, "-m", "mixtral_export.bench.load_memory", "--load", str(folder),
                              "--dtype", args.dtype],
                             capture_output=True, text=True, check=True)
        params, peak, seconds = out.stdout.split()
        params, peak, base = int(params), int(peak), int(baseline.stdout)
        gib = 1 << 30
        print(f"layers={args.layers} dtype={args.dtype} checkpoint={on_disk / gib:.2f} GiB "
              f"shards={len(list(folder.glob('*.safetensors')))}")
        print(f"model parameters {params / gib:.2f} GiB; peak RSS {peak / gib:.2f} GiB "
              f"(import baseline {base / gib:.2f} GiB); peak - baseline = {(peak - base) / params:.3f} x weights; "
              f"load {float(seconds):.1f} s")


if __name__ == "__main__":
    main()
