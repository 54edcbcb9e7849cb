"""Peak memory and time of an ONNX export against the model's size, next to a plain copy of its bytes.

For each layer count, writes a checkpoint with Mixtral 8x7B dimensions (zeroed weights, written
shard by shard so the benchmark itself stays small; 1 GiB shards like the real one), copies its
shards with plain file copies (the same number of bytes, read and written once), exports it in a
fresh process (peak RSS = its VmHWM, time = wall time of export_onnx), copies the shards again
(copy, export, copy: interleaved; each after a sync, so none starts with another's write-back
pending), removing each output at once and everything before the next count, so the disk holds
one model and one export (or copy) at a time.

    python3 bench/export_memory.py --layers 1,2,4 --dtype bfloat16 [--routing dense] [--dir DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load_memory import MIXTRAL_8X7B  # noqa: E402

SHARD_BYTES = 1 << 30
ZEROS = bytes(64 << 20)

EXPORT = """
import json, sys, time
sys.path.insert(0, sys.argv[4])
from bench.load_memory import peak_rss
from graphs.onnx_export import export_onnx
stages = {}
def note(line):  # when the weights start and stop being written
    stages.setdefault("write" if line.startswith("writing model.onnx.data") else line.split()[0], time.perf_counter())
start = time.perf_counter()
export_onnx(sys.argv[1], sys.argv[2], dtype=None, batch=1, prefill_chunk=16, routing=sys.argv[3], progress=note)
end = time.perf_counter()
print(json.dumps({"seconds": end - start, "peak": peak_rss(), "trace_seconds": stages["write"] - start,
                  "write_seconds": stages["checking"] - stages["write"]}))
"""
BASELINE = """
import sys
sys.path.insert(0, sys.argv[1])
import graphs.onnx_export, onnx, onnxscript, torch
from bench.load_memory import peak_rss
print(peak_rss())
"""


def checkpoint_tensors(layers: int, h: int, i: int, v: int, e: int, kv: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, in the order a Mixtral checkpoint lists them."""
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(layers):
        p = f"model.layers.{n}"
        shapes.update({f"{p}.input_layernorm.weight": (h,), f"{p}.self_attn.q_proj.weight": (h, h),
                       f"{p}.self_attn.k_proj.weight": (kv, h), f"{p}.self_attn.v_proj.weight": (kv, h),
                       f"{p}.self_attn.o_proj.weight": (h, h), f"{p}.post_attention_layernorm.weight": (h,),
                       f"{p}.block_sparse_moe.gate.weight": (e, h)})
        for x in range(e):
            shapes.update({f"{p}.block_sparse_moe.experts.{x}.w1.weight": (i, h),
                           f"{p}.block_sparse_moe.experts.{x}.w2.weight": (h, i),
                           f"{p}.block_sparse_moe.experts.{x}.w3.weight": (i, h)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return shapes


def write(folder: Path, layers: int, dtype: str) -> int:
    """A zeroed mixtral-shaped checkpoint, written 64 MiB at a time; returns the weights' bytes."""
    from mixtral_export.config import MixtralConfig

    config = MixtralConfig(num_hidden_layers=layers, dtype=dtype, **MIXTRAL_8X7B)
    item, code = {"float32": (4, "F32"), "float16": (2, "F16"), "bfloat16": (2, "BF16")}[dtype]
    shapes = checkpoint_tensors(layers, config.hidden_size, config.intermediate_size, config.vocab_size,
                                config.num_local_experts, config.num_key_value_heads * config.head_dim)
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * item
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    folder.mkdir(parents=True)
    weight_map = {}
    for n, names in enumerate(shards, start=1):
        file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name in names:
            nbytes = math.prod(shapes[name]) * item
            header[name] = {"dtype": code, "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        raw = json.dumps(header).encode()
        with open(folder / file, "wb") as handle:
            handle.write(struct.pack("<Q", len(raw)) + raw)
            while offset > 0:
                offset -= handle.write(ZEROS[:min(offset, len(ZEROS))])
    total = sum(math.prod(shape) * item for shape in shapes.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.write_json(folder / "config.json")
    return total


def measure(folder: Path, layers: int, dtype: str, routing: str) -> dict:
    """One run: a plain copy, the export, a plain copy again (interleaved: the page cache's
    write-back swings a copy's time 3x from minute to minute), each output removed at once."""
    repo = str(Path(__file__).resolve().parents[1])
    checkpoint, art = folder / "checkpoint", folder / "onnx"
    weights = write(checkpoint, layers, dtype)
    before, copied = plain_copy(checkpoint, folder / "copy")
    os.sync()
    done = subprocess.run([sys.executable, "-c", EXPORT, str(checkpoint), str(art), routing, repo],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr.strip().splitlines()[-1])
    export = json.loads(done.stdout.strip().splitlines()[-1])
    written = (art / "model.onnx.data").stat().st_size
    shutil.rmtree(art)
    after, _ = plain_copy(checkpoint, folder / "copy")
    hash_seconds = sha256_seconds(checkpoint)
    shutil.rmtree(checkpoint)
    return {"layers": layers, "dtype": dtype, "routing": routing, "weights_bytes": weights,
            "written_bytes": written, "export_seconds": export["seconds"], "export_peak_rss": export["peak"],
            "trace_seconds": export["trace_seconds"], "write_seconds": export["write_seconds"],
            "copied_bytes": copied, "copy_seconds": [before, after], "sha256_seconds": hash_seconds}


def sha256_seconds(checkpoint: Path) -> float:
    """Seconds to sha256 the checkpoint's shards alone (the hash every export pays and a copy does not)."""
    buffer = memoryview(bytearray(8 << 20))
    start = time.perf_counter()
    for shard in sorted(checkpoint.glob("*.safetensors")):
        digest = hashlib.sha256()
        with open(shard, "rb", buffering=0) as handle:
            while got := handle.readinto(buffer):
                digest.update(buffer[:got])
    return time.perf_counter() - start


def plain_copy(checkpoint: Path, copy: Path) -> tuple[float, int]:
    """Seconds to copy the checkpoint's shards with shutil (the kernel's copy), and the bytes; removed after."""
    copy.mkdir()
    os.sync()  # every phase starts with nothing waiting to be written back (the checkpoint just written...)
    start = time.perf_counter()
    for shard in sorted(checkpoint.glob("*.safetensors")):
        shutil.copyfile(shard, copy / shard.name)
    seconds = time.perf_counter() - start
    copied = sum(p.stat().st_size for p in copy.iterdir())
    shutil.rmtree(copy)
    return seconds, copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="1,2,4", help="comma-separated layer counts")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--routing", default="dense")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    repo = str(Path(__file__).resolve().parents[1])
    base = int(subprocess.run([sys.executable, "-c", BASELINE, repo], capture_output=True, text=True,
                              check=True).stdout)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for layers in (int(n) for n in args.layers.split(",")):
            row = measure(Path(tmp), layers, args.dtype, args.routing)
            row["import_baseline_rss"] = base
            rows.append(row)
            gb = 1e9
            copies = " / ".join(f"{c:.1f} s" for c in row["copy_seconds"])
            copy_rates = " / ".join(f"{row['copied_bytes'] / c / 1e6:.0f}" for c in row["copy_seconds"])
            ratios = " / ".join(f"{row['write_seconds'] / c:.2f}x" for c in row["copy_seconds"])
            print(f"layers={layers} {args.dtype} {args.routing}: weights {row['weights_bytes'] / gb:.2f} GB, "
                  f"export {row['export_seconds']:.1f} s (trace {row['trace_seconds']:.1f} s, "
                  f"write {row['written_bytes'] / gb:.2f} GB in {row['write_seconds']:.1f} s = "
                  f"{row['written_bytes'] / row['write_seconds'] / 1e6:.0f} MB/s); peak RSS "
                  f"{row['export_peak_rss'] / (1 << 30):.2f} GiB (imports alone {base / (1 << 30):.2f} GiB); "
                  f"plain copy of {row['copied_bytes'] / gb:.2f} GB before / after the export {copies} "
                  f"({copy_rates} MB/s); write / copy = {ratios}; sha256 of the same bytes alone "
                  f"{row['sha256_seconds']:.1f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
