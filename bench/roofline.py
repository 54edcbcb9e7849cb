"""The bandwidth bound of decode: the bytes one decode step must read, and the tokens/s that allows.

At batch 1 a decode step is a chain of matrix-vector products: every weight it uses is read once
from memory for one token, so tokens/s <= bandwidth / bytes read per token. Those bytes are:

    per layer   attention (q, k, v, o) + router + 2 norms + the KV positions attended to
                + the experts run: all E (dense) or the token's top k (gather; transformers too)
    once        the embedding row of the token, the final norm and the lm_head

With int8/int4 weights (--weights) the quantized tensors (attention, experts, lm_head) count their
codes plus a float32 scale per block (and a zero point per block at 4 bits); the rest stays fp32.
The KV part is the cache slots S for the static graphs (they attend over the whole ring, masked;
over the span bucket in use on ONNX Runtime with a span-axis graph) and the context length for
transformers (its cache grows with the sequence), at the cache's type (`kv_dtype`; int8 counts its
codes plus a float32 scale per slot and kv head).
"""
from __future__ import annotations

from mixtral_export.artifact.config import MixtralConfig

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
WEIGHTS = ("fp32", "int8", "int4")  # bench --weights: fp32 = the checkpoint's float32


def weight_bytes(weights: str, dtype: str, block_size: int) -> float:
    """Bytes per element of a quantized tensor (codes, scale, zero point) or of a float one."""
    if weights == "fp32":
        return DTYPE_BYTES[dtype]
    from mixtral_export.artifact.contract import WEIGHT_SCHEMES

    scheme = WEIGHT_SCHEMES[weights]
    return (scheme.bits + 32 / block_size + (0 if scheme.symmetric else scheme.bits / block_size)) / 8


def decode_bytes(config: MixtralConfig, routing: str, kv_positions: int, weights: str = "fp32",
                 block_size: int = 32, kv_dtype: str | None = None) -> int:
    """Bytes of weights and cache one batch-1 decode step reads under `routing` ("dense" | "gather")."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    experts = config.num_local_experts if routing == "dense" else config.num_experts_per_tok
    full, quantized = DTYPE_BYTES[config.dtype], weight_bytes(weights, config.dtype, block_size)
    layer = ((h * q + 2 * h * kv + q * h) * quantized  # q, k, v, o projections
             + (config.num_local_experts * h + 2 * h) * full  # router, two RMSNorms
             + experts * 3 * h * i * quantized  # w1, w3, w2 of each expert run
             + 2 * kv * kv_positions * kv_bytes_per_element(config, kv_dtype))  # keys and values attended to
    once = (h + h) * full + v * h * quantized  # the token's embedding row, the final norm, lm_head
    return int(config.num_hidden_layers * layer + once)


def kv_bytes_per_element(config: MixtralConfig, kv_dtype: str | None) -> float:
    """Bytes per cached key/value element: the build's dtype's, or an int8 code plus its share of the
    float32 scale every head_dim elements carry."""
    if kv_dtype == "int8":
        return 1 + 4 / config.head_dim
    return DTYPE_BYTES[kv_dtype or config.dtype]


def bound_tokens_per_second(bandwidth_gbps: float, config: MixtralConfig, routing: str, kv_positions: int,
                            weights: str = "fp32", block_size: int = 32) -> float:
    return bandwidth_gbps * 1e9 / decode_bytes(config, routing, kv_positions, weights, block_size)


LLAMA_KV_ELEMENT_BYTES = {"float32": 4, "float16": 2, "int8": 34 / 32}  # llama.cpp's f32, f16, q8_0 (32 codes + an f16 scale)


def kv_bytes(config: MixtralConfig, kv_positions: int, kv: str = "float32") -> int:
    """Bytes of llama.cpp's KV cache's keys and values at `kv_positions`, every layer, its cache type
    as bench runs it (`kv`: ours, int8 as q8_0); its weights' bytes come from the GGUF file, bench/gguf.py."""
    elements = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * kv_positions
    return int(elements * LLAMA_KV_ELEMENT_BYTES[kv])
