"""The bandwidth bound of decode: the bytes one decode step must read, and the tokens/s that allows.

At batch 1 a decode step is a chain of matrix-vector products: every weight it uses is read once
from memory for one token, so tokens/s <= bandwidth / bytes read per token. Those bytes are:

    per layer   attention (q, k, v, o) + router + 2 norms + the KV positions attended to
                + the experts run: all E (dense) or the token's top k (gather; transformers too)
    once        the embedding row of the token, the final norm and the lm_head

The KV part is the cache slots S for the static graphs (they attend over the whole ring, masked)
and the context length for transformers (its cache grows with the sequence).
"""
from __future__ import annotations

from mixtral_export.config import MixtralConfig

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def decode_bytes(config: MixtralConfig, routing: str, kv_positions: int) -> int:
    """Bytes of weights and cache one batch-1 decode step reads under `routing` ("dense" | "gather")."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    experts = config.num_local_experts if routing == "dense" else config.num_experts_per_tok
    layer = (h * q + 2 * h * kv + q * h  # q, k, v, o projections
             + config.num_local_experts * h + 2 * h  # router, two RMSNorms
             + experts * 3 * h * i  # w1, w3, w2 of each expert run
             + 2 * kv * kv_positions)  # keys and values attended to
    once = h + h + v * h  # the token's embedding row, the final norm, lm_head
    return (config.num_hidden_layers * layer + once) * DTYPE_BYTES[config.dtype]


def bound_tokens_per_second(bandwidth_gbps: float, config: MixtralConfig, routing: str, kv_positions: int) -> float:
    return bandwidth_gbps * 1e9 / decode_bytes(config, routing, kv_positions)
