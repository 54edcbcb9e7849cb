"""Interleaved A/B of two weights writers on one traced graph, from the page cache.

Traces the checkpoint's step once with placeholder weights, then writes model.onnx.data with this
tree's writer (sha256_blocks on a pool) and with the writer of an older checkout (`--old`, e.g.
`git worktree add /tmp/old 2ec0a75`: one whole-file sha256 thread), in turn, each written file
removed at once. Prints wall and process CPU seconds per write, and the page-cache copy of the
checkpoint's shards between rounds (the bar: write <= 2x that copy).

    python3 -m mixtral_export.bench.writer_ab CHECKPOINT --old /tmp/old [--routing gather] [--rounds 2] [--dir DIR]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path

from mixtral_export.bench.export_memory import evict, shards, warm_copy
from mixtral_export.graphs import weights_file
from mixtral_export.graphs.onnx_export import DATA_NAME, GRAPH_NAME, export_config, placeholder_model, step_graph


def old_writer(tree: Path):
    """save_with_weights of the checkout at `tree` (its graphs/weights_file.py, beside our modules)."""
    spec = importlib.util.spec_from_file_location("old_weights_file", tree / "graphs" / "weights_file.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.save_with_weights


def page_cache_copy(checkpoint: Path, folder: Path) -> float:
    """Seconds to copy the shards, each read through first (untimed) and its copy removed at once."""
    return sum(warm_copy(shard, folder) for shard in shards(checkpoint))


def disk_reads() -> int:
    """Bytes this process (all its threads) has had read from the disk so far."""
    return int(next(line.split()[1] for line in Path("/proc/self/io").read_text().splitlines()
                    if line.startswith("read_bytes:")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--old", type=Path, required=True, action="append",
                        help="a checkout of an older writer (repeat for more: old0, old1, ...)")
    parser.add_argument("--routing", default="dense")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--cold", action="store_true",
                        help="evict the checkpoint before each write (it reads the disk); no page-cache copy")
    args = parser.parse_args()
    from mixtral_export.artifact.contract import StepShapes
    from mixtral_export.checkpoint import ParameterReader

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        out = Path(tmp)
        config = export_config(args.checkpoint, out / "unused", args.dtype, args.routing)
        shapes = StepShapes.for_config(config, batch=1, prefill_chunk=16, dtype=config.dtype)
        reader = ParameterReader(args.checkpoint, config)
        graph = step_graph(placeholder_model(config, shapes, args.routing), shapes, 18, reader.read)
        weights = {value: value.const_value for value in graph.graph.initializers.values()}
        writers = {"new": weights_file.save_with_weights,
                   **{f"old{n}": old_writer(tree) for n, tree in enumerate(args.old)}}
        for round in range(args.rounds):
            if args.cold:
                print(f"round {round}: checkpoint evicted before each write", flush=True)
            else:
                print(f"round {round}: page-cache copy {page_cache_copy(args.checkpoint, out):.2f} s", flush=True)
            names = list(writers)
            for name in names[round % len(names):] + names[:round % len(names)]:  # each goes first in turn
                for value, tensor in weights.items():
                    value.const_value = tensor
                if args.cold:
                    evict(shards(args.checkpoint))
                read, cpu, start = disk_reads(), os.times(), time.perf_counter()
                result = writers[name](graph, out / GRAPH_NAME, DATA_NAME)  # old: (size, sha256); new: FileEntry
                wall, after = time.perf_counter() - start, os.times()
                size = (out / DATA_NAME).stat().st_size
                print(f"  {name}: {size / 1e9:.2f} GB in {wall:.2f} s ({size / wall / 1e6:.0f} MB/s), process CPU "
                      f"{after.user - cpu.user + after.system - cpu.system:.2f} s, load "
                      f"{os.getloadavg()[0]:.2f}, read from disk {(disk_reads() - read) / 1e9:.2f} GB, "
                      f"hash {getattr(result, 'digest', None) or result[1]}", flush=True)
                (out / DATA_NAME).unlink()


if __name__ == "__main__":
    main()
