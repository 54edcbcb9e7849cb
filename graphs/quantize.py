"""Block-wise weight-only quantization of whole weights, as the export streams them.

The codes themselves (what a scheme's bytes mean, how one (N, K) matrix becomes codes and back,
the packed layouts ONNX Runtime's MatMulNBits and QMoE take) are the artifact's weight codes,
mixtral_export.artifact.weight_codes, which the eager runtime decodes too. This module checks the
block size against the weight, quantizes (..., N, K) stacks one matrix at a time (a stack of experts
as it streams from the checkpoint) and measures the error against the float weight.
"""
from __future__ import annotations

import math

import numpy as np

from mixtral_export.artifact.contract import QUANT_BLOCK_SIZES, WeightScheme
from mixtral_export.artifact.weight_codes import QuantizeError, Quantized, dequantize, quantize_matrix


def check_block(k: int, block_size: int, name: str) -> None:
    if block_size not in QUANT_BLOCK_SIZES:
        raise QuantizeError(f"{name}: block size {block_size} is not one of {', '.join(map(str, QUANT_BLOCK_SIZES))}")
    if k % block_size:
        raise QuantizeError(f"{name}: {k} input features do not split into blocks of {block_size}; "
                            f"pick a block size that divides {k}")


def quantize(w: np.ndarray, scheme: WeightScheme, block_size: int, name: str = "weight") -> Quantized:
    """W (..., N, K) float -> codes, scales and zero points; leading dims (experts) one at a time."""
    return quantize_with_error(w, scheme, block_size, name)[0]


def quantize_with_error(w: np.ndarray, scheme: WeightScheme, block_size: int,
                        name: str = "weight") -> tuple[Quantized, dict[str, float]]:
    """quantize() and error() together, one (N, K) matrix at a time: a 3.8 GB stack of experts
    never has a float copy made of it whole."""
    w = np.asarray(w)
    *lead, n, k = w.shape
    return quantize_matrices((w[index] for index in np.ndindex(*lead)), (*lead, n, k), scheme, block_size, name)


def quantize_matrices(matrices, shape: tuple[int, ...], scheme: WeightScheme, block_size: int,
                      name: str = "weight") -> tuple[Quantized, dict[str, float]]:
    """quantize_with_error() of the weight `shape` (..., N, K) given as its (N, K) matrices in
    order (a stack of experts as it streams from the checkpoint, one virtual expert at a time)."""
    *lead, n, k = shape
    check_block(k, block_size, name)
    blocks, bits = k // block_size, scheme.bits
    packed = np.empty((*lead, n, blocks, block_size * bits // 8), np.uint8)
    scales = np.empty((*lead, n, blocks), np.float32)
    zero_points = None if scheme.symmetric else np.empty((*lead, n, -(-blocks * bits // 8)), np.uint8)
    worst, total, size = 0.0, 0.0, 0
    indices = np.ndindex(*lead)
    for matrix in matrices:
        index = next(indices)
        matrix = np.asarray(matrix)
        if matrix.shape != (n, k):
            raise QuantizeError(f"{name}: a matrix of shape {list(matrix.shape)}, expected {[n, k]}")
        one = quantize_matrix(matrix, scheme, block_size)
        packed[index], scales[index] = one.packed, one.scales
        if zero_points is not None:
            zero_points[index] = one.zero_points
        diff = np.abs(matrix.astype(np.float32, copy=False) - dequantize(one))  # (N, K)
        worst, total, size = max(worst, float(diff.max())), total + float(diff.sum(dtype=np.float64)), size + diff.size
    if size != math.prod(shape):
        raise QuantizeError(f"{name}: got {size} of its {math.prod(shape)} values")
    return (Quantized(packed, scales, zero_points, bits, block_size),
            {"max_abs": worst, "mean_abs": total / max(size, 1)})


def error(w: np.ndarray, q: Quantized) -> dict[str, float]:
    """Max and mean |w - dequantize(q)| over the whole tensor."""
    diff = np.abs(np.asarray(w, dtype=np.float32) - dequantize(q))
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean(dtype=np.float64))}


