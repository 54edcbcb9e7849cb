"""Peak memory and time of an ONNX export against the model's size, next to plain copies of its bytes.

For each layer count, writes a checkpoint with Mixtral 8x7B dimensions (random bf16 values, written
shard by shard so the benchmark itself stays small; 1 GiB shards like the real one), then, each
after a sync, with every output removed at once (the disk holds the checkpoint and one export or
copy at a time):

1. a plain copy of its shards (shutil, the kernel's copy) after evicting them from the page cache:
   the copy reads the disk, as any copy of a checkpoint larger than the page cache does;
2. the export in a fresh process (peak RSS = its VmHWM, time = wall time of export_onnx), with
   the checkpoint read into the page cache first when it fits in half the available memory (else
   evicted: it reads the disk; the row says which);
3. a plain copy served from the page cache, shard by shard (each read through first, untimed),
   and the export's hash (sha256_blocks on its threads, graphs/block_hash.py) and a whole-file
   sha256 (the previous writer's) of the same warm bytes alone: the memory-speed floor.

Write / copy is reported against both copies. To keep the checkpoint's writing out of a
measurement (8 layers: 23 GB), write it once, then measure on it, one routing per command:

    python3 -m mixtral_export.bench.export_memory --layers 1,2,4 --dtype bfloat16 [--routing dense] [--dir DIR]
    python3 -m mixtral_export.bench.export_memory --write-checkpoint DIR/ckpt8 --layers 8      # not a measurement
    python3 -m mixtral_export.bench.export_memory --checkpoint DIR/ckpt8 --routing gather --dir DIR
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from mixtral_export.bench.load_memory import MIXTRAL_8X7B
from mixtral_export.artifact.block_hash import BLOCK_BYTES, hash_file, hash_threads
from mixtral_export.artifact.manifest import sha256_file

SHARD_BYTES = 1 << 30
POOL_BYTES = 64 << 20  # the random values every tensor's bytes are cut from

EXPORT = """
import json, os, sys, time
from mixtral_export.bench.load_memory import peak_rss
from mixtral_export.graphs.onnx_export import export_onnx
stages, cpu = {}, {}
def note(line):  # when the weights start and stop being written, and the process's CPU seconds then
    stage = "write" if line.startswith("writing model.onnx.data") else line.split()[0]
    stages.setdefault(stage, time.perf_counter())
    cpu.setdefault(stage, sum(os.times()[:2]))
start = time.perf_counter()
export_onnx(sys.argv[1], sys.argv[2], dtype=sys.argv[4], batch=1, prefill_chunk=16, routing=sys.argv[3], progress=note)
end = time.perf_counter()
print(json.dumps({"seconds": end - start, "peak": peak_rss(), "trace_seconds": stages["write"] - start,
                  "write_seconds": stages["checking"] - stages["write"],
                  "write_cpu_seconds": cpu["checking"] - cpu["write"]}))
"""
BASELINE = """
import mixtral_export.graphs.onnx_export, onnx, onnxscript, torch
from mixtral_export.bench.load_memory import peak_rss
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
    """A mixtral-shaped checkpoint, written 64 MiB at a time; returns the weights' bytes.

    The header is padded to 8 bytes as the safetensors library pads it (unaligned, the kernel's
    copy of a tensor whose offset differs from its offset in the data file by an odd number of bytes
    ran 1.6x slower here). Its values are normal(0, 0.02) in `dtype`, one 64 MiB pool of them cut at a different place
    for each tensor: not zeros, which a virtual disk may store as holes (reads and writes that
    never reach the disk), and no two tensors alike."""
    import torch

    from mixtral_export.artifact.config import MixtralConfig

    config = MixtralConfig(num_hidden_layers=layers, dtype=dtype, **MIXTRAL_8X7B)
    item, code = {"float32": (4, "F32"), "float16": (2, "F16"), "bfloat16": (2, "BF16")}[dtype]
    torch_dtype = getattr(torch, dtype)
    pool = (torch.randn(POOL_BYTES // item, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch_dtype)
    pool = memoryview(torch.cat([pool, pool]).view(torch.uint8).numpy())  # (2 * POOL_BYTES,): any cut of POOL_BYTES
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
        raw += b" " * (-len(raw) % 8)  # as the safetensors library pads it: tensors start 8-byte aligned
        with open(folder / file, "wb") as handle:
            handle.write(struct.pack("<Q", len(raw)) + raw)
            for name in names:
                left, cut = math.prod(shapes[name]) * item, zlib.crc32(name.encode()) % (POOL_BYTES // item) * item
                while left > 0:
                    left -= handle.write(pool[cut:cut + min(left, POOL_BYTES)])
    total = sum(math.prod(shape) * item for shape in shapes.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.write_json(folder / "config.json")
    return total


def measure(folder: Path, layers: int, dtype: str, routing: str, checkpoint: Path | None = None) -> dict:
    """One row: a plain copy of the checkpoint's shards that reads the disk, the export, a plain copy
    served from the page cache; each output removed at once. The checkpoint is written first and
    removed after, unless `checkpoint` names one to use (and keep)."""
    art = folder / "onnx"
    written_here = checkpoint is None
    if written_here:
        checkpoint = folder / "checkpoint"
        weights = write(checkpoint, layers, dtype)
    else:
        weights = sum(shard.stat().st_size for shard in shards(checkpoint))
    disk, copied = disk_copy(checkpoint, folder / "copy")
    source = "page cache" if warm(checkpoint) else "disk"  # what the export reads from
    done = subprocess.run([sys.executable, "-c", EXPORT, str(checkpoint), str(art), routing, dtype],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr.strip().splitlines()[-1])
    export = json.loads(done.stdout.strip().splitlines()[-1])
    written = (art / "model.onnx.data").stat().st_size
    shutil.rmtree(art)
    cached, hash_seconds, blocks_seconds = page_cache_copy(checkpoint, folder / "copy")
    if written_here:
        shutil.rmtree(checkpoint)
    return {"layers": layers, "dtype": dtype, "routing": routing, "weights_bytes": weights,
            "written_bytes": written, "export_seconds": export["seconds"], "export_peak_rss": export["peak"],
            "trace_seconds": export["trace_seconds"], "write_seconds": export["write_seconds"],
            "write_cpu_seconds": export["write_cpu_seconds"],
            "export_reads_from": source, "copied_bytes": copied, "disk_copy_seconds": disk,
            "page_cache_copy_seconds": cached, "sha256_seconds": hash_seconds,
            "blocks_seconds": blocks_seconds, "hash": f"sha256_blocks/{BLOCK_BYTES >> 20}M",
            "hash_threads": hash_threads(), "load_average": os.getloadavg()[0]}


def shards(checkpoint: Path) -> list[Path]:
    return sorted(checkpoint.glob("*.safetensors"))


def evict(files: list[Path]) -> None:
    """Drop these files' pages from the page cache (written back first), so the next read is the disk's."""
    os.sync()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(checkpoint: Path) -> bool:
    """Read the checkpoint into the page cache when it fits in half the memory available (the export
    then reads it from there, as a copy right after downloading would), else evict it: the
    export reads the disk. Returns whether it is warm."""
    files = shards(checkpoint)
    available = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemAvailable:"))) * 1024
    if sum(path.stat().st_size for path in files) > available // 2:
        evict(files)
        return False
    buffer = memoryview(bytearray(8 << 20))
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    os.sync()
    return True


def disk_copy(checkpoint: Path, copy: Path) -> tuple[float, int]:
    """Seconds to copy the checkpoint's shards with shutil (the kernel's copy) after evicting them
    from the page cache: the copy reads the disk, as any copy of a checkpoint larger than the
    page cache does. Returns (seconds, bytes); the copy is removed after."""
    copy.mkdir()
    evict(shards(checkpoint))
    start = time.perf_counter()
    for shard in shards(checkpoint):
        shutil.copyfile(shard, copy / shard.name)
    seconds = time.perf_counter() - start
    copied = sum(p.stat().st_size for p in copy.iterdir())
    shutil.rmtree(copy)
    return seconds, copied


def warm_copy(shard: Path, folder: Path) -> float:
    """Seconds shutil takes to copy `shard` into `folder` once it is in the page cache (read through
    first, untimed); the copy is removed at once, its dirty pages with it, so no write-back is left
    for the next one."""
    buffer = memoryview(bytearray(8 << 20))
    with open(shard, "rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass
    start = time.perf_counter()
    shutil.copyfile(shard, folder / shard.name)
    seconds = time.perf_counter() - start
    (folder / shard.name).unlink()
    return seconds


def page_cache_copy(checkpoint: Path, copy: Path) -> tuple[float, float, float]:
    """Seconds to copy the checkpoint's shards with shutil when each is in the page cache (read
    through first, untimed; each copy removed at once, see warm_copy), to
    sha256 the same warm bytes alone (the previous writer's whole-file hash) and to hash them as
    the export does (sha256_blocks on its threads; the hash a copy does not pay): the
    copy at memory speed, which no export of a checkpoint larger than the page cache can see.
    One shard at a time, each copy removed at once."""
    copy.mkdir()
    copying = hashing = blocks = 0.0
    for shard in shards(checkpoint):
        copying += warm_copy(shard, copy)
        start = time.perf_counter()
        sha256_file(shard)
        hashing += time.perf_counter() - start
        start = time.perf_counter()
        hash_file(shard)
        blocks += time.perf_counter() - start
    copy.rmdir()
    return copying, hashing, blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="1,2,4", help="comma-separated layer counts")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--routing", default="dense")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--write-checkpoint", type=Path, default=None, metavar="FOLDER",
                        help="only write a mixtral-shaped checkpoint of --layers layers there (not a measurement)")
    parser.add_argument("--checkpoint", type=Path, default=None, metavar="FOLDER",
                        help="measure on this checkpoint (from --write-checkpoint) instead of writing one; kept")
    args = parser.parse_args()
    if args.write_checkpoint:
        weights = write(args.write_checkpoint, int(args.layers), args.dtype)
        print(f"{args.write_checkpoint}: {weights / 1e9:.2f} GB of weights")
        return
    base = int(subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True,
                              check=True).stdout)
    counts = [json.loads((args.checkpoint / "config.json").read_text())["num_hidden_layers"]] if args.checkpoint \
        else [int(n) for n in args.layers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for layers in counts:
            row = measure(Path(tmp), layers, args.dtype, args.routing, args.checkpoint)
            row["import_baseline_rss"] = base
            rows.append(row)
            gb, write_s = 1e9, row["write_seconds"]
            disk, cached = row["disk_copy_seconds"], row["page_cache_copy_seconds"]
            print(f"layers={layers} {args.dtype} {args.routing}: weights {row['weights_bytes'] / gb:.2f} GB, "
                  f"export {row['export_seconds']:.1f} s (trace {row['trace_seconds']:.1f} s, "
                  f"write {row['written_bytes'] / gb:.2f} GB in {write_s:.1f} s = "
                  f"{row['written_bytes'] / write_s / 1e6:.0f} MB/s, {row['write_cpu_seconds']:.1f} s of CPU, "
                  f"reading the checkpoint from the "
                  f"{row['export_reads_from']}); peak RSS {row['export_peak_rss'] / (1 << 30):.2f} GiB (imports alone "
                  f"{base / (1 << 30):.2f} GiB); plain copy of the same {row['copied_bytes'] / gb:.2f} GB: "
                  f"reading the disk {disk:.1f} s ({row['copied_bytes'] / disk / 1e6:.0f} MB/s), "
                  f"from the page cache {cached:.1f} s ({row['copied_bytes'] / cached / 1e6:.0f} MB/s); "
                  f"write / copy = {write_s / disk:.2f}x the disk copy, {write_s / cached:.2f}x the page-cache copy; "
                  f"hash {row['hash']} on {row['hash_threads']} threads; of the same bytes alone (page "
                  f"cache): that {row['blocks_seconds']:.1f} s, whole-file sha256 {row['sha256_seconds']:.1f} s; "
                  f"load average {row['load_average']:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
