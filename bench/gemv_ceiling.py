"""The kernel ceiling of batch-1 decode: how fast one matrix-vector product reads its weight on each side.

A batch-1 decode step is a chain of GEMVs, so a runtime's decode tokens/s over another's cannot beat
the ratio of their GEMV read rates by much. This measures, interleaved in one process, the GB/s of:

    ort    one ONNX Runtime MatMul node, x (1, K) @ W (K, N), W an initializer (prepacked, as in our graphs)
    torch  torch.nn.functional.linear(x, W) with W (N, K), as transformers' Linear layers run it
    read   a SIMD integer max over the same bytes split across the threads: reading and nothing else

    python3 -m mixtral_export.bench.gemv_ceiling [--mib 512] [--rounds 3] [--threads N]
"""
from __future__ import annotations

import argparse
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mixtral_export.bench.worker import rates
from mixtral_export.runtimes.ort import session_options, usable_cores


def ort_matmul(weight: np.ndarray, threads: int, folder: Path):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "gemv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(folder / "gemv.onnx"), save_as_external_data=True, location="gemv.onnx.data")
    session = ort.InferenceSession(str(folder / "gemv.onnx"), session_options(threads, spin=False),
                                   providers=["CPUExecutionProvider"])  # threads as OrtBackend sets them
    x = np.random.default_rng(1).standard_normal((1, k), dtype=np.float32)  # (1, K)
    return lambda: session.run(None, {"x": x})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="Size of the weight")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=usable_cores())
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    k = 4096
    n = args.mib * 2**20 // (4 * k)
    weight = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)  # (K, N)
    torch_weight = torch.from_numpy(np.ascontiguousarray(weight.T))  # (N, K), as nn.Linear stores it
    torch_x = torch.randn(1, k)  # (1, K)
    parts = np.array_split(weight.reshape(-1).view(np.uint32), args.threads)
    pool = ThreadPoolExecutor(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        ort_run = ort_matmul(weight, args.threads, Path(folder))
        kinds = {"ort": ort_run, "torch": lambda: torch.nn.functional.linear(torch_x, torch_weight),
                 "read": lambda: list(pool.map(np.max, parts))}
        samples: dict[str, list[float]] = {kind: [] for kind in kinds}
        for _ in range(args.rounds):
            for kind, work in kinds.items():
                samples[kind] += rates(work, weight.nbytes, args.repeats)
    median = {kind: float(np.median(values)) for kind, values in samples.items()}
    print(f"GEMV of a ({k} x {n}) fp32 weight ({weight.nbytes / 2**20:.0f} MiB), {args.threads} threads, "
          f"{args.rounds} interleaved rounds x {args.repeats}:")
    for kind, values in samples.items():
        print(f"  {kind:5s} {median[kind]:5.1f} GB/s median ({min(values):.1f}-{max(values):.1f})")
    print(f"  ort / torch {median['ort'] / median['torch']:.2f}x; ort at {median['ort'] / median['read']:.0%} "
          f"and torch at {median['torch'] / median['read']:.0%} of the read rate")


if __name__ == "__main__":
    main()
