"""A weight scheme's codes: how one float matrix becomes codes, scales and zero points, and back.

This is what a quantized artifact's bytes mean (artifact/contract.py names the schemes): the export
encodes with it (graphs/quantize.py streams whole weights through it and measures the error) and
the eager runtime decodes the same codes to run on exactly the weights the artifact holds.

A weight W (..., N, K) (N output rows, K input features; a Linear's weight, one expert's fc1 or
fc2) is cut along K into blocks of `block_size`; each (row, block) gets a float32 scale and, for
an asymmetric scheme, a zero point z; the code of w is q = clip(round(w / scale) + z). What the
kernels compute with is dequantize(): (q - z) * scale, z = 2^(bits-1) when none is stored.
Symmetric codes follow llama.cpp's: 8-bit as q8_0 (scale max|w| / 127), 4-bit as q4_0 (the
block's largest-magnitude weight m sets the scale m / -8, so all 16 codes are used; the scale may
be negative, which the kernels take as it is), refined per block as llama.cpp's k-quants refine
theirs: of the scales m / d, d in INT4_DIVISORS (-8 first: q4_0's own), the block keeps the one
with the least squared error (a slightly smaller step that clips m beats q4_0's on ~3 blocks in 4;
on Gaussian weights 10% less squared error at blocks of 64, 12% at 128; same bytes, same kernels).
Rounding is numpy's (half to even): the same weights always give the same bytes.

Layouts (checked against onnxruntime 1.32's CPU kernels in tests/test_quantize.py):
  packed       (..., N, K/block, block*bits/8) uint8: 4-bit codes two to a byte, the even
               element of K in the low nibble (MatMulNBits' B; QMoE's fc weights as
               (E, N, K*bits/8), the same bytes)
  scales       (..., N, K/block) float32
  zero_points  (..., N, ceil(K/block*bits/8)) uint8, packed like the codes, or None (symmetric)

Pure numpy; never torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mixtral_export.artifact.contract import WeightScheme
from mixtral_export.errors import UserError

INT4_DIVISORS = tuple(-8 - j / 4 for j in range(8))  # int4 scale candidates m / d; -8: q4_0's rule
SEARCH_ROWS = 256  # rows searched at a time: the candidates' temporaries stay in cache


class QuantizeError(UserError, ValueError):
    """A weight this scheme cannot quantize (shape, block size); one line."""


@dataclass(frozen=True)
class Quantized:
    packed: np.ndarray  # (..., N, K/block, block*bits/8) uint8
    scales: np.ndarray  # (..., N, K/block) float32
    zero_points: np.ndarray | None  # (..., N, ceil(K/block*bits/8)) uint8; None: 2^(bits-1)
    bits: int
    block_size: int


def quantize_matrix(w: np.ndarray, scheme: WeightScheme, block_size: int) -> Quantized:
    """One (N, K) float matrix -> its codes, scales and zero points under the scheme (K a multiple of the block)."""
    n, k = w.shape
    blocks = w.astype(np.float32, copy=False).reshape(n, k // block_size, block_size)  # (N, K/b, b)
    if scheme.symmetric:
        half = 2 ** (scheme.bits - 1)
        if scheme.bits == 8:  # llama.cpp q8_0's rule: codes -127..127, scale max|w| / 127
            low, high, scales = -(half - 1), half - 1, np.abs(blocks).max(-1) / np.float32(half - 1)  # (N, K/b)
        else:  # q4_0's rule, searched: scale m / d for the block's largest-magnitude weight m
            low, high, scales = -half, half - 1, searched_scales(blocks)
        scales[scales == 0] = 1
        codes = np.clip(np.round(blocks / scales[..., None]), low, high) + np.float32(half)
        zero_points = None
    else:
        top = 2 ** scheme.bits - 1  # codes 0..top, zero exactly representable
        low, high = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)  # (N, K/b)
        scales = (high - low) / np.float32(top)
        scales[scales == 0] = 1
        zeros = np.clip(np.round(-low / scales), 0, top)  # (N, K/b)
        codes = np.clip(np.round(blocks / scales[..., None]) + zeros[..., None], 0, top)
        zero_points = pack(zeros.astype(np.uint8), scheme.bits)  # (N, ceil(K/b * bits/8))
    packed = pack(codes.astype(np.uint8).reshape(n, k), scheme.bits)  # (N, K*bits/8)
    return Quantized(packed.reshape(n, k // block_size, block_size * scheme.bits // 8),
                     scales.astype(np.float32), zero_points, scheme.bits, block_size)


def searched_scales(blocks: np.ndarray) -> np.ndarray:
    """(N, K/b, b) -> (N, K/b) int4 scales: per block the m / d (INT4_DIVISORS) whose codes
    (round, clip to -8..7) give the least squared error; the first such d on ties."""
    out = np.empty(blocks.shape[:2], np.float32)
    for start in range(0, len(blocks), SEARCH_ROWS):
        rows = blocks[start:start + SEARCH_ROWS]  # (n, K/b, b)
        extreme = np.take_along_axis(rows, np.abs(rows).argmax(-1)[..., None], -1)[..., 0]  # (n, K/b)
        best, least = None, None
        for divisor in INT4_DIVISORS:
            scales = extreme / np.float32(divisor)  # (n, K/b)
            scales[scales == 0] = 1
            codes = np.clip(np.round(rows / scales[..., None]), -8, 7)  # (n, K/b, b)
            squared = np.square(codes * scales[..., None] - rows).sum(-1)  # (n, K/b)
            if best is None:
                best, least = scales, squared
            else:
                better = squared < least
                best, least = np.where(better, scales, best), np.where(better, squared, least)
        out[start:start + SEARCH_ROWS] = best
    return out


def dequantize(q: Quantized) -> np.ndarray:
    """The float32 weight (..., N, K) the kernels compute with: (code - zero point) * scale."""
    *lead, blocks, _ = q.packed.shape
    codes = unpack(q.packed.reshape(*lead, -1), q.bits).astype(np.float32)  # (..., N, K)
    codes = codes.reshape(*lead, blocks, q.block_size)  # (..., N, K/b, b)
    if q.zero_points is None:
        zeros = np.float32(2 ** (q.bits - 1))
    else:
        zeros = unpack(q.zero_points, q.bits)[..., :blocks].astype(np.float32)[..., None]  # (..., N, K/b, 1)
    return ((codes - zeros) * q.scales[..., None]).reshape(*lead, blocks * q.block_size)


def round_trip(w: np.ndarray, scheme: WeightScheme, block_size: int) -> np.ndarray:
    """W (..., N, K) -> the float32 weight its codes decode to, one (N, K) matrix at a time."""
    w = np.asarray(w)
    out = np.empty(w.shape, np.float32)  # (..., N, K)
    for index in np.ndindex(*w.shape[:-2]):
        out[index] = dequantize(quantize_matrix(w[index], scheme, block_size))
    return out


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes (..., K) -> (..., ceil(K*bits/8)): 8-bit as is, 4-bit element 2j low nibble, 2j+1 high."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    if bits != 4:
        raise QuantizeError(f"{bits}-bit codes are not supported (4 or 8)")
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)  # pad a nibble
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """(..., ceil(K*bits/8)) -> uint8 codes (..., K or K+1)."""
    if bits == 8:
        return packed
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 0x0F, packed >> 4
    return out
