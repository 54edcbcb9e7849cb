"""A static-shape Mixtral: one pure step function over a chunk of tokens and a rolling KV cache.

The step follows `mixtral_export.artifact.contract`: every tensor shape is fixed by (B, T, S) and the config, the
MoE is dense-masked (all experts run, weighted by a top-k mask) or gathered (only each token's
top-k experts run), and there is no Python branching on tensor values, so the same module traces
to ONNX, TensorRT and torch.compile.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixtral_export.artifact.contract import FLOAT_DTYPES

from mixtral_export.artifact.config import MixtralConfig

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
TORCH_DTYPES = {name: getattr(torch, name) for name in FLOAT_DTYPES}
ROUTINGS = ("dense", "gather")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin of absolute positions, computed in fp32 like the reference."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # (B, 1, T, D)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention_mask(positions: torch.Tensor, cache_positions: torch.Tensor,
                   window: int | None) -> torch.Tensor:
    """Which keys (cache slots, then chunk tokens) each query may see: (B, 1, 1, T, S+T) bool."""
    key_positions = torch.cat((cache_positions, positions), dim=1)  # (B, S+T)
    q = positions[:, :, None]  # (B, T, 1)
    k = key_positions[:, None, :]  # (B, 1, S+T)
    visible = (k >= 0) & (k <= q)
    if window is not None:
        visible = visible & (q - k < window)
    return visible[:, None, None]  # (B, 1, 1, T, S+T)


class Attention(nn.Module):
    def __init__(self, config: MixtralConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5
        hidden, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(hidden, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, hidden, bias=False)
        self.integer_matmul = integer_matmul  # an int8 cache's products; the ONNX export swaps in MatMulInteger

    def forward(self, x, cos, sin, cache_k, cache_v, mask, scale_k=None, scale_v=None):
        """cache_k/v (B, Hkv, S, D) in the cache's type; scale_k/v (B, Hkv, S) for an int8 cache's codes."""
        b, t, _ = x.shape
        hkv, g, d = self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(b, t, self.n_heads, d).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, hkv, d).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(b, t, hkv, d).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        # The cache and the chunk are attended separately and never concatenated: a (S+T)-slot
        # copy of K and V per layer and step would cost more traffic than the attention itself.
        s = cache_k.shape[2]
        q = q.reshape(b, hkv, g * t, d)  # (B, Hkv, G*T, D): query head h uses kv head h // G
        if scale_k is None:
            cached = torch.matmul(q, cache_k.to(q.dtype).transpose(-1, -2))  # (B, Hkv, G*T, S); .to: no-op at the build's dtype
        else:
            cached = code_scores(self.integer_matmul, q, cache_k, scale_k)  # (B, Hkv, G*T, S)
        scores = torch.cat((cached, torch.matmul(q, k.transpose(-1, -2))), dim=-1)  # (B, Hkv, G*T, S+T)
        scores = scores.view(b, hkv, g, t, s + t).float() * self.scale  # (B, Hkv, G, T, S+T)
        scores = torch.where(mask, scores, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(q.dtype).view(b, hkv, g * t, s + t)  # (B, Hkv, G*T, S+T)
        if scale_v is None:
            cached = torch.matmul(probs[..., :s], cache_v.to(q.dtype))  # (B, Hkv, G*T, D)
        else:
            cached = code_mix(self.integer_matmul, probs[..., :s], cache_v, scale_v).to(q.dtype)  # (B, Hkv, G*T, D)
        out = cached + torch.matmul(probs[..., s:], v)  # (B, Hkv, G*T, D)
        out = out.view(b, self.n_heads, t, d).transpose(1, 2).reshape(b, t, self.n_heads * d)  # (B, T, H*D)
        return self.o_proj(out), k, v


def int8_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (..., K) rounded to int8 per block of K (scale max|x| / 127, times its reciprocal, half to
    even), exactly as ONNX Runtime's quantized CPU kernels round their inputs, so eager on a
    quantized artifact's dequantized weights computes what they compute (dividing by the scale
    instead flips a code now and then)."""
    blocks = x.reshape(*x.shape[:-1], -1, block)  # (..., K/b, b)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.round(blocks * (1 / scale)) * scale).reshape(x.shape)


class MoE(nn.Module):
    """Mixtral's top-k routing (fp32 router softmax, top-k, renormalise) computed one of two ways.

    dense: every expert runs on every token, weighted by a (N, E) mask; reads every expert once.
    gather: gpt-fast's decode MoE: each token's k experts' weights are indexed out and only they
    run, so a decode step reads k/E of the expert weights (plus a copy: eager torch materialises
    the gathered weights). A chunk whose tokens pick at least as many experts as exist
    (N * k >= E: any prefill chunk worth the name) runs dense instead, since copying N * k experts
    would cost more than reading all E once; that is a branch on static shapes, never on values.
    The ONNX export traces gather as one com.microsoft.MoE node instead (graphs/onnx_moe.py), which
    reads only the chosen experts for any N, with no copy.
    """

    def __init__(self, config: MixtralConfig, routing: str = "dense"):
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"routing {routing!r} is not one of {', '.join(ROUTINGS)}")
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.routing = routing
        self.top_k = config.num_experts_per_tok
        self.intermediate = i
        self.act = ACTIVATIONS[config.hidden_act]
        self.gate = nn.Linear(h, e, bias=False)
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h))  # rows [0, I) = w1 (gate), [I, 2I) = w3 (up)
        self.w2 = nn.Parameter(torch.empty(e, h, i))
        self.activation_block: int | None = None  # set: expert GEMM inputs rounded to int8 (int8_blocks)

    def top_k_routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H) -> renormalised top-k softmax weights (N, k) fp32 and expert ids (N, k)."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)  # (N, E)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        return top_w / top_w.sum(dim=-1, keepdim=True), top_i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        x = x.reshape(b * t, h)  # (N, H)
        if self.routing == "gather" and b * t * self.top_k < self.w13.shape[0]:
            out = self.gathered(x)
        else:
            out = self.dense(x)
        return out.reshape(b, t, h)

    def expert_input(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) as the expert GEMMs read it: as is, or rounded by int8_blocks."""
        return x if self.activation_block is None else int8_blocks(x, self.activation_block)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        top_w, top_i = self.top_k_routing(x)
        weights = torch.zeros(x.shape[0], self.w13.shape[0], dtype=torch.float32,
                              device=x.device).scatter(1, top_i, top_w)  # (N, E)
        up = torch.matmul(self.w13, self.expert_input(x).t())  # (E, 2I, N)
        hidden = self.act(up[:, : self.intermediate]) * up[:, self.intermediate:]  # (E, I, N)
        if self.activation_block is not None:
            hidden = self.expert_input(hidden.transpose(1, 2)).transpose(1, 2)  # blocks run along I
        out = torch.matmul(self.w2, hidden)  # (E, H, N)
        out = (out.float() * weights.t()[:, None, :]).sum(dim=0)  # (H, N)
        return out.t().to(x.dtype)

    def gathered(self, x: torch.Tensor) -> torch.Tensor:
        top_w, top_i = self.top_k_routing(x)
        up = torch.matmul(self.w13[top_i], self.expert_input(x)[:, None, :, None])[..., 0]  # (N, k, 2I, H) @ (N, 1, H, 1) -> (N, k, 2I)
        hidden = self.expert_input(self.act(up[..., : self.intermediate]) * up[..., self.intermediate:])  # (N, k, I)
        out = torch.matmul(self.w2[top_i], hidden[..., None])[..., 0]  # (N, k, H, I) @ (N, k, I, 1) -> (N, k, H)
        return (out.float() * top_w[..., None]).sum(dim=1).to(x.dtype)  # (N, H)


class Block(nn.Module):
    def __init__(self, config: MixtralConfig, routing: str = "dense"):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.moe = MoE(config, routing)

    def forward(self, x, cos, sin, cache_k, cache_v, mask, live=None, scale_k=None, scale_v=None):
        attn, k, v = self.self_attn(self.input_layernorm(x), cos, sin, cache_k, cache_v, mask, scale_k, scale_v)
        x = x + attn
        h = self.post_attention_layernorm(x)  # (B, T, H)
        x = x + self.moe(h if live is None else padding_routed_as_live(h, live))
        return x, k, v


def padding_routed_as_live(h: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Padding tokens (position -1, live False) take the first live token's MoE input, so they pick
    the experts that token reads anyway: an idle row or chunk column costs no expert reads of its own
    in a gathered graph (a padding token's output is never read). Live tokens are unchanged."""
    first = torch.argmax(live.reshape(-1).to(torch.int32), dim=0, keepdim=True)  # (1,) first live of B*T, 0 if none
    return torch.where(live[..., None], h, h.reshape(-1, h.shape[-1]).index_select(0, first))  # (B, T, H)


class MixtralStatic(nn.Module):
    """The step function of `mixtral_export.artifact.contract` as a module: (ids, positions, cache) -> (logits, new k/v).

    With `layers=(first, stop)` it is one pipeline stage: only layers [first, stop) (still named
    layers.{i} by their place in the whole model, so a checkpoint's tensors land by name), the
    embedding only when first is 0, the final norm and LM head only when stop is the last layer. A
    stage that does not embed takes the previous stage's hidden state (B, T, H) in place of the ids;
    one that does not end returns its hidden state (B, T, H) in place of the logits. The step body
    is the same code either way.
    """

    def __init__(self, config: MixtralConfig, attention_window: int | None, routing: str = "dense",
                 lm_head: bool = True, layers: tuple[int, int] | None = None, embed: bool = True,
                 kv_dtype: str | None = None):
        """lm_head=False: the trunk alone, for the other heads (mixtral_export/head_model.py); embed=False:
        the first stage takes embedded ids (a tied table held by the last stage); kv_dtype: the cache's
        element type (None: the model's; "int8": codes and scales, `kv_codes`)."""
        super().__init__()
        first, stop = layers or (0, config.num_hidden_layers)
        if not 0 <= first < stop <= config.num_hidden_layers:
            raise ValueError(f"layers [{first}, {stop}) are not a range of the model's {config.num_hidden_layers}")
        self.config = config
        self.attention_window = attention_window
        self.kv_dtype = kv_dtype
        self.routing = routing
        self.first_layer, self.stop_layer = first, stop
        self.embeds, self.ends = first == 0 and embed, stop == config.num_hidden_layers
        if self.embeds:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # layers before `first` are empty places, so every block keeps its global name
        self.layers = nn.ModuleList(Block(config, routing) if i >= first else nn.Module() for i in range(stop))
        if self.ends:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            if lm_head:
                self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
                if config.tie_word_embeddings and self.embeds:
                    self.lm_head.weight = self.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def blocks(self) -> list[tuple[int, Block]]:
        """(global layer index, block) of the layers this module runs, in order."""
        return [(i, self.layers[i]) for i in range(self.first_layer, self.stop_layer)]

    def forward(self, input_ids, positions, cache_k, cache_v, cache_positions, cache_k_scale=None, cache_v_scale=None):
        """input_ids/positions (B, T) int64 (input_ids: the hidden state (B, T, H) for a stage that does not
        embed), cache_k/v (L, B, Hkv, S, D) or L tensors (B, Hkv, S, D) (the exported graphs take one
        input per layer; L: this module's layers), cache_positions (B, S); an int8 cache's scales
        cache_k/v_scale (L, B, Hkv, S) or L tensors (B, Hkv, S)."""
        x, new_k, new_v = self.hidden_states(input_ids, positions, cache_k, cache_v, cache_positions,
                                             cache_k_scale, cache_v_scale)
        if not self.ends:
            return x, new_k, new_v  # (B, T, H): the next stage's input (stages keep the build's cache dtype)
        logits = self.lm_head(x).float()  # (B, T, V)
        if self.kv_dtype == "int8":
            (codes_k, scale_k), (codes_v, scale_v) = kv_codes(new_k), kv_codes(new_v)
            return logits, codes_k, codes_v, scale_k, scale_v  # codes (L, B, Hkv, T, D), scales (L, B, Hkv, T)
        if self.kv_dtype is not None:
            new_k, new_v = new_k.to(TORCH_DTYPES[self.kv_dtype]), new_v.to(TORCH_DTYPES[self.kv_dtype])
        return logits, new_k, new_v  # new_k/v: (L, B, Hkv, T, D)

    def hidden_states(self, input_ids, positions, cache_k, cache_v, cache_positions, cache_k_scale=None,
                      cache_v_scale=None):
        """The step without its LM head: the final norm's output (B, T, H) (a stage that does not end:
        its last layer's) and the chunk's keys/values."""
        x = self.embed_tokens(input_ids) if self.embeds else input_ids  # (B, T, H)
        d = self.config.head_dim  # inv_freq is made here, in fp32, so no .to(dtype) can round it
        inv_freq = 1.0 / (self.config.rope_theta ** (
            torch.arange(0, d, 2, dtype=torch.int64, device=x.device).float() / d))  # (D/2,)
        cos, sin = rope_tables(positions, inv_freq, x.dtype)
        mask = attention_mask(positions, cache_positions, self.attention_window)
        live = positions >= 0  # (B, T)
        new_k, new_v = [], []
        for n, (_, layer) in enumerate(self.blocks()):
            scales = (None, None) if cache_k_scale is None else (cache_k_scale[n], cache_v_scale[n])
            x, k, v = layer(x, cos, sin, cache_k[n], cache_v[n], mask, live, *scales)
            new_k.append(k)
            new_v.append(v)
        x = self.norm(x) if self.ends else x
        return x, torch.stack(new_k), torch.stack(new_v)  # (B, T, H), new_k/v: (L, B, Hkv, T, D)

def integer_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of integer codes (int8 / uint8), exactly, as int32: what ONNX's MatMulInteger returns
    (float64 holds every such sum exactly; the int8 cache keeps its sums within int32)."""
    return torch.matmul(a.double(), b.double()).to(torch.int32)


def code_scores(matmul, q: torch.Tensor, codes_k: torch.Tensor, scale_k: torch.Tensor) -> torch.Tensor:
    """q (B, Hkv, M, D) against an int8 cache's keys, codes (B, Hkv, S, D) and scales (B, Hkv, S):
    q is rounded to int8 codes per row as the cache's keys are (llama.cpp's q8_0 dot product does
    the same), the codes are multiplied as integers, reading 1 byte per cached element instead of
    widening the cache to float first, and both scales applied to the sums. (B, Hkv, M, S)."""
    q_codes, q_scale = kv_codes(q)  # (B, Hkv, M, D) int8, (B, Hkv, M)
    dots = matmul(codes_k, q_codes.transpose(-1, -2))  # (B, Hkv, S, M) int32: the cache is the long side
    return (dots.float() * scale_k[..., None] * q_scale[:, :, None, :]).transpose(-1, -2).to(q.dtype)


def code_mix(matmul, probs: torch.Tensor, codes_v: torch.Tensor, scale_v: torch.Tensor) -> torch.Tensor:
    """probs (B, Hkv, M, S) over an int8 cache's values, codes (B, Hkv, S, D) and scales (B, Hkv, S):
    each row's weights probs * scale_v in 16-bit fixed point (its max / 65535 a step), split into
    high and low bytes, both multiplied with the codes as integers in one product (the rows
    stacked), so the values are read once as 1-byte codes. Sums stay within int32 up to 65536
    slots. (B, Hkv, M, D) float32."""
    weights = probs.float() * scale_v[:, :, None, :]  # (B, Hkv, M, S), >= 0
    step = weights.amax(-1, keepdim=True) / 65535  # (B, Hkv, M, 1)
    step = torch.where(step == 0, torch.ones_like(step), step)
    fixed = torch.round(weights / step)  # (B, Hkv, M, S) in [0, 65535]
    high = torch.floor(fixed / 256)
    halves = torch.cat((high, fixed - high * 256), dim=2).to(torch.uint8)  # (B, Hkv, 2M, S)
    sums = matmul(halves, codes_v).float()  # (B, Hkv, 2M, D)
    m = probs.shape[2]
    return (sums[:, :, :m] * 256 + sums[:, :, m:]) * step  # (B, Hkv, M, D)


def kv_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys or values (..., D) as an int8 cache stores them: symmetric codes and a float32 scale per
    vector, max|x| / 127 over D (1 for an all-zero vector), so x ~ codes * scale."""
    scale = x.float().abs().amax(-1) / 127  # (...)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.clamp(torch.round(x.float() / scale[..., None]), -127, 127).to(torch.int8)  # (..., D)
    return codes, scale
