"""How fast ONNX Runtime's quantized kernels run Mixtral-sized work, per precision, input rounding and chunk length.

    python3 -m mixtral_export.bench.quant_kernels [--tokens 1,16,128] [--rounds 3] [--threads N] [--parts 8]

One com.microsoft.QMoE node (8 experts, hidden 4096, intermediate 14336, top-2,
sliced 8 ways as graphs/onnx_moe.py exports it) on random codes, timed interleaved in one process
for every variant: int8 (its CPU kernel always rounds activations to int8); int4 with float
activations (accuracy_level 0, what `export --weights int4` writes) and with int8 activations
(accuracy_level 4). Then one MatMulNBits node of lm_head's shape (4096 -> 32000) at 8 and 4 bits
with float and with int8-rounded inputs, beside a float32 MatMul. Prints ms per call (median)
and the GB/s of weight bytes that implies for T=1. (An fp32 MoE is left out: its 3.8 GB node does
not fit one protobuf; bench/step_profile.py times it in a graph.)
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from mixtral_export.runtimes.ort import session_options, usable_cores

E, H, I, K, BLOCK = 8, 4096, 14336, 2, 32


def node_session(bits: int, accuracy: int, threads: int, parts: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    e, inter = E * parts, I // parts  # (P*E) virtual experts of I/P units
    attrs = dict(k=K * parts, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1)

    def codes(n, k):
        return rng.integers(0, 256, (e, n, k * bits // 8), dtype=np.uint8)

    def scales(n, k):
        return (rng.random((e, n, k // BLOCK), dtype=np.float32) * 1e-3).astype(np.float32)

    parts = [codes(2 * inter, H), scales(2 * inter, H), codes(H, inter), scales(H, inter)]
    inits = [numpy_helper.from_array(a, n) for a, n in zip(parts, ("w1", "s1", "w2", "s2"))]
    node = helper.make_node("QMoE", ["x", "r", "w1", "s1", "", "w2", "s2"], ["y"], domain="com.microsoft",
                            expert_weight_bits=bits, block_size=BLOCK, weights_prepacked=0,
                            accuracy_level=accuracy, **attrs)
    weight_bytes = sum(a.nbytes for a in parts)
    graph = helper.make_graph([node], "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", H]),
                                              helper.make_tensor_value_info("r", TensorProto.FLOAT, ["T", e])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", H])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), session_options(threads, spin=False),
                                   providers=["CPUExecutionProvider"])
    return session, weight_bytes * K / E  # bytes a token's top-k experts hold


def lm_head_session(bits: int | None, accuracy: int, threads: int):
    """x (T, 4096) @ W (4096, 32000): a float MatMul (bits None) or MatMulNBits; (session, weight bytes)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng, k, n = np.random.default_rng(2), H, 32000
    if bits is None:
        w = rng.standard_normal((k, n), dtype=np.float32)
        inits, node = [numpy_helper.from_array(w, "W")], helper.make_node("MatMul", ["x", "W"], ["y"])
    else:
        codes = rng.integers(0, 256, (n, k // BLOCK, BLOCK * bits // 8), dtype=np.uint8)
        scales = rng.random((n, k // BLOCK), dtype=np.float32) * 1e-3
        inits = [numpy_helper.from_array(codes, "B"), numpy_helper.from_array(scales, "S")]
        node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                                block_size=BLOCK, accuracy_level=accuracy)
    graph = helper.make_graph([node], "lm_head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), session_options(threads, spin=False),
                                   providers=["CPUExecutionProvider"])
    return session, sum(numpy_helper.to_array(i).nbytes for i in inits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,16,128")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=usable_cores())
    parser.add_argument("--parts", type=int, default=8, help="Slices per expert (graphs/onnx_moe.py)")
    args = parser.parse_args()
    variants = {"int8": (8, 0), "int4 float act": (4, 0), "int4 int8 act": (4, 4)}
    sessions = {f"QMoE {name}": node_session(bits, acc, args.threads, args.parts) for name, (bits, acc) in variants.items()}
    heads = {"fp32": (None, 0), "int8 float act": (8, 0), "int8 int8 act": (8, 4), "int4 float act": (4, 0),
             "int4 int8 act": (4, 4)}
    sessions.update({f"lm_head {name}": lm_head_session(bits, acc, args.threads) for name, (bits, acc) in heads.items()})
    rng = np.random.default_rng(1)
    tokens = [int(t) for t in args.tokens.split(",")]
    times = {(name, t): [] for name in sessions for t in tokens}
    for _ in range(args.rounds):
        for t in tokens:
            x = rng.standard_normal((t, H), dtype=np.float32)
            r = np.tile(rng.standard_normal((t, E), dtype=np.float32), (1, args.parts))  # (T, P*E): slice p of e at p*E+e
            for name, (session, _) in sessions.items():
                feeds = {"x": x, "r": r} if name.startswith("QMoE") else {"x": x}
                session.run(None, feeds)  # warm
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    session.run(None, feeds)
                    times[name, t].append(time.perf_counter() - start)
    for name, (_, active) in sessions.items():
        cells = []
        for t in tokens:
            ms = 1e3 * statistics.median(times[name, t])
            cells.append(f"T={t} {ms:.1f} ms" + (f" ({active / ms / 1e6:.1f} GB/s)" if t == 1 else ""))
        print(f"{name:24s} " + ", ".join(cells))


if __name__ == "__main__":
    main()
