"""The step-graph contract: what every prefill/decode step takes and returns.

Both sides import this module: the model and exporters produce graphs that honour it, the
runtimes drive them through it. It must never import torch.

One step consumes a chunk of T new tokens (T = one of prefill_chunks, or 1) for B rows:

  inputs
    input_ids        (B, T)           int64   token ids; anything in range for padding
    positions        (B, T)           int64   absolute position of each token, -1 = no token
    cache_k.0 .. cache_k.{L-1}
                     (B, Hkv, S, D)   dtype   each layer's keys of earlier tokens, RoPE already applied
    cache_v.0 .. cache_v.{L-1}
                     (B, Hkv, S, D)   dtype   each layer's values of earlier tokens
    cache_positions  (B, S)           int64   absolute position held by each slot, -1 = empty
    cache_k_scale.0 .. , cache_v_scale.0 ..
                     (B, Hkv, S)      float32 int8 caches only: each slot's scale per kv head
  outputs
    logits           (B, T, V)        float32 next-token logits at every chunk position
    new_k            (L, B, Hkv, T, D) kv     keys of this chunk (after RoPE)
    new_v            (L, B, Hkv, T, D) kv     values of this chunk
    new_k_scale, new_v_scale
                     (L, B, Hkv, T)   float32 int8 caches only: the chunk's scales

"kv" is the cache's element type (`StepShapes.cache_dtype`, `export --kv-dtype`): the build's dtype
by default, float16 (half the ring's bytes) or int8 (a quarter, plus 4 bytes per slot and kv head):
symmetric codes, scale = max|x| / 127 over each token's head_dim, so x ~ code * scale. The graph
writes the chunk's keys/values in that type and reads the cache back as the build's dtype
(scores times the key scale per slot, probabilities times the value scale per slot); the chunk
attends to its own keys unrounded.

A query at position p attends to a key at position q (from the cache or the chunk) iff
q >= 0, q <= p and p - q < attention_window. The runtime then writes the chunk's keys/values
into ring slots q % S (only where q >= 0) and records q in cache_positions: the cache is never
copied whole. Runtimes keep one (L, B, Hkv, S, D) array per side and bind each layer's slice
(`layer_caches`): a graph input per layer, because ONNX Runtime copies any slice it takes of a
stacked input, which per layer and step would cost twice the traffic of reading the cache.
Because the chunk attends to the cache *before* it is written, a W-slot ring never
lets the slot about to be overwritten leak in, and never loses a key a query still needs.

Spans (StepShapes.span_axis, graphs exported since the span axis exists): the slot axis S of the
cache inputs and cache_positions is symbolic (SPAN_AXIS), so a step may pass any span s <= S of
slots instead of the whole ring. While no row has wrapped (every position < S) slot = position,
so the slots in use are the prefix [0, extent) and a step needs only s >= the longest row's extent
after the step; a runtime that compiles per shape picks s from `span_buckets` (powers of two from
MIN_SPAN, then S) with `span_for`, one that takes any span the tighter `tight_span` (the same up to
STRIDED_FROM slots, then multiples of SPAN_STRIDE), and each keeps the ring laid out as
(L, B, Hkv, s, D) so that prefix is one contiguous view (re-laid out when the span changes).
Slots past a row's extent are empty (position -1, keys and values 0) and masked: they add
exp(min - max) = 0 to the softmax and 0 * 0 to the output, so a span gives the full ring's result. Once any row wraps, s = S. Graphs without the axis (older
manifests, span_axis False) take the whole ring every step.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from mixtral_export.errors import UserError

OUTPUT_NAMES = ("logits", "new_k", "new_v")
SCALE_OUTPUT_NAMES = ("new_k_scale", "new_v_scale")  # an int8 cache's outputs besides OUTPUT_NAMES
NO_POSITION = -1
CHUNK_AXIS = "T"  # the name of the chunk-length axis in an exported graph
SPAN_AXIS = "S"  # the name of the cache-span axis (slots passed to a step) in a span-axis graph
MIN_SPAN = 64  # the smallest span bucket: below it a step's cost is not the cache's
MAX_INT8_CACHE_SLOTS = 65536  # an int8 cache's value products (255 * 127 per slot) stay within int32
SPAN_STRIDE = 256  # past STRIDED_FROM slots, a runtime that takes any span grows it this many at a time
STRIDED_FROM = 4 * SPAN_STRIDE  # up to here tight spans are the power-of-two buckets


@dataclass(frozen=True)
class DType:
    """One element type under every name the toolchain uses for it (torch's is `getattr(torch, name)`)."""

    name: str  # the config/manifest spelling, also numpy's (bfloat16: ml_dtypes') and torch's attribute
    onnx: int  # onnx.TensorProto element type
    ort: str  # onnxruntime's NodeArg.type
    itemsize: int


DTYPES = {d.name: d for d in (DType("float32", 1, "tensor(float)", 4), DType("float16", 10, "tensor(float16)", 2),
                              DType("bfloat16", 16, "tensor(bfloat16)", 2), DType("int64", 7, "tensor(int64)", 8),
                              DType("int8", 3, "tensor(int8)", 1))}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")  # what weights, caches and a build's dtype may be
KV_DTYPES = (*FLOAT_DTYPES, "int8")  # what the KV cache may be stored as (int8: codes and a scale per slot)
QUANTIZED_KV = "int8"


@dataclass(frozen=True)
class WeightScheme:
    """Weight-only quantization of one artifact (graphs/quantize.py does the arithmetic).

    Block-wise along K (a weight's input features): each run of `block_size` weights of one
    output row shares a float32 scale, and with symmetric=False a `bits`-wide zero point;
    symmetric codes sit around the fixed zero point 2^(bits-1) (what ONNX Runtime assumes when
    none is stored). Every quantized GEMM rounds its input to int8 per block (scale max|x|/127),
    as llama.cpp's q8_0/q4_0 dot products do: ONNX Runtime's CPU kernels (accuracy_level 4) are
    fast only that way (with float inputs MatMulNBits ran lm_head 100x slower at 8 bits and 2.3x
    at 4; the 8-bit QMoE kernel has no float path at all).
    """

    name: str
    bits: int
    symmetric: bool
    block_size: int = 32  # the default block: the largest whose fidelity measured above llama.cpp's at these bits
    activations: str = "int8"  # what the quantized GEMMs read (the runtimes' accuracy_level 4)


WEIGHT_SCHEMES = {s.name: s for s in (WeightScheme("int8", 8, symmetric=True, block_size=64),
                                      WeightScheme("int4", 4, symmetric=True, block_size=128))}
INT8_ACTIVATIONS = 4  # com.microsoft QMoE / MatMulNBits accuracy_level: inputs rounded to int8 per block
FLOAT_WEIGHTS = "float"  # --weights default: the build's dtype, no quantization
QUANT_BLOCK_SIZES = (32, 64, 128)
DEFAULT_QUANT_BLOCK = 32  # a block size where no scheme is named (the schemes' own: WEIGHT_SCHEMES)


def default_block_size(weights: str) -> int:
    """The block an int8/int4 export gets when none is asked for (docs/quantization.md measures it)."""
    scheme = WEIGHT_SCHEMES.get(weights)
    return scheme.block_size if scheme else DEFAULT_QUANT_BLOCK
# Which weights a scheme quantizes; the token embeddings, the router and the norms stay float.
QUANTIZED_WEIGHTS = ("experts", "attention", "lm_head")


class ContractError(UserError, ValueError):
    """Build parameters that cannot describe a valid step graph."""


@dataclass(frozen=True)
class StepShapes:
    """Static shapes of one artifact, fixed at build time."""

    batch: int
    prefill_chunk: int
    cache_slots: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: str
    # Keys visible to a query: p - q < attention_window. None = unbounded (full causal), in
    # which case a sequence may never outgrow cache_slots.
    attention_window: int | None
    # Every prefill length T served, ascending (prefill_chunk is the largest): a short prompt
    # runs a short step instead of padding to the largest. () = just prefill_chunk (older manifests).
    prefill_chunks: tuple[int, ...] = ()
    # True: the graph's cache slot axis is symbolic (SPAN_AXIS), so a step may pass a prefix span of
    # the ring (see the module docstring); False (older manifests): every step passes all S slots.
    span_axis: bool = False
    # The KV cache's element type; None = the build's dtype (every manifest before --kv-dtype).
    kv_dtype: str | None = None

    def __post_init__(self) -> None:
        for name in ("batch", "prefill_chunk", "cache_slots"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ContractError(f"{name} must be a positive integer, got {value!r}")
        for value in self.prefill_chunks:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ContractError(f"prefill_chunks must be positive integers, got {value!r}")
        lengths = tuple(sorted(set(self.prefill_chunks))) or (self.prefill_chunk,)
        if lengths[-1] != self.prefill_chunk:
            raise ContractError(f"prefill_chunk ({self.prefill_chunk}) must be the largest of prefill_chunks "
                                f"{list(lengths)}")
        object.__setattr__(self, "prefill_chunks", lengths)  # one spelling, so equal shapes compare equal
        if self.prefill_chunk > self.cache_slots:
            raise ContractError(f"prefill_chunk ({self.prefill_chunk}) must not exceed "
                                f"cache_slots ({self.cache_slots}): a chunk's keys must fit the ring")
        if self.dtype not in FLOAT_DTYPES:
            raise ContractError(f"dtype {self.dtype!r} is not supported (one of {', '.join(FLOAT_DTYPES)})")
        if self.kv_dtype is not None and self.kv_dtype not in KV_DTYPES:
            raise ContractError(f"kv dtype {self.kv_dtype!r} is not supported (one of {', '.join(KV_DTYPES)})")
        if self.kv_dtype == self.dtype:
            object.__setattr__(self, "kv_dtype", None)  # one spelling for the default
        if self.kv_dtype == "int8" and self.cache_slots > MAX_INT8_CACHE_SLOTS:
            raise ContractError(f"an int8 KV cache holds at most {MAX_INT8_CACHE_SLOTS} slots (its integer "
                                f"attention sums in int32); cache_slots is {self.cache_slots}")
        if self.attention_window is not None and self.attention_window > self.cache_slots:
            raise ContractError(f"attention_window ({self.attention_window}) must not exceed "
                                f"cache_slots ({self.cache_slots})")

    @property
    def chunks(self) -> tuple[int, ...]:
        """The chunk lengths T a step serves: the prefill chunks, largest first, then 1 (each once)."""
        return tuple(dict.fromkeys((*reversed(self.prefill_chunks), 1)))

    def prefill_length(self, tokens: int) -> int:
        """The T of a prefill step whose longest piece left is `tokens`: the smallest prefill chunk that
        holds it, else the largest (the prompt then takes more steps)."""
        return next((t for t in self.prefill_chunks if t >= tokens), self.prefill_chunk)

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the cache can serve, or None when the ring slides forever."""
        return self.cache_slots if self.attention_window is None else None

    def cache_shape(self, span: int | None = None) -> tuple[int, int, int, int, int]:
        """The runtime's cache per side: (L, B, Hkv, S, D), or (L, B, Hkv, span, D) for a span of it;
        the graph takes it layer by layer."""
        return (self.num_layers, self.batch, self.num_kv_heads, span or self.cache_slots, self.head_dim)

    @property
    def span_buckets(self) -> tuple[int, ...]:
        """The spans a step may pass: powers of two from MIN_SPAN below S, then S; just S without the axis."""
        if not self.span_axis:
            return (self.cache_slots,)
        small = []
        while (span := MIN_SPAN << len(small)) < self.cache_slots:
            small.append(span)
        return (*small, self.cache_slots)

    def span_for(self, extent: int) -> int:
        """The smallest span bucket holding slots [0, extent): what a step needs when the longest row,
        after the step, holds positions below `extent` (extent > S, a wrapped ring: S)."""
        return next((s for s in self.span_buckets if s >= extent), self.cache_slots)

    def tight_span(self, extent: int) -> int:
        """The span a runtime whose graph takes any span passes (ONNX Runtime, eager): the bucket up to
        STRIDED_FROM slots, then the next multiple of SPAN_STRIDE (at most S). Past a few thousand
        filled slots a power of two would read up to twice the slots in use; runtimes that compile
        per shape (compiled, TensorRT) keep to `span_buckets`."""
        if not self.span_axis or extent <= STRIDED_FROM:
            return self.span_for(extent)
        return min(-(-extent // SPAN_STRIDE) * SPAN_STRIDE, self.cache_slots)

    @property
    def cache_dtype(self) -> str:
        """The KV cache's element type (int8: codes, with a float32 scale per slot and kv head)."""
        return self.kv_dtype or self.dtype

    @property
    def scaled_cache(self) -> bool:
        return self.cache_dtype == QUANTIZED_KV

    def cache_bytes_per_row(self) -> int:
        """Bytes of one batch row's keys and values (and scales), every layer, all S slots."""
        slots = self.num_layers * 2 * self.num_kv_heads * self.cache_slots
        return slots * self.head_dim * DTYPES[self.cache_dtype].itemsize + (slots * 4 if self.scaled_cache else 0)

    @property
    def input_names(self) -> tuple[str, ...]:
        scales = (*layer_names("cache_k_scale", self.num_layers), *layer_names("cache_v_scale", self.num_layers))
        return ("input_ids", "positions", *layer_names("cache_k", self.num_layers),
                *layer_names("cache_v", self.num_layers), "cache_positions", *(scales if self.scaled_cache else ()))

    @property
    def output_names(self) -> tuple[str, ...]:
        return (*OUTPUT_NAMES, *(SCALE_OUTPUT_NAMES if self.scaled_cache else ()))

    def input_shapes(self, chunk: int, span: int | None = None) -> dict[str, tuple[int, ...]]:
        """Every input's shape for chunk length T = `chunk` and `span` cache slots (None: all S)."""
        layer = self.cache_shape(span)[1:]  # (B, Hkv, S, D)
        shapes = {"input_ids": (self.batch, chunk), "positions": (self.batch, chunk),
                  "cache_positions": (self.batch, span or self.cache_slots)}
        return {name: shapes.get(name, layer if name.startswith(("cache_k.", "cache_v.")) else layer[:-1])
                for name in self.input_names}  # scales: (B, Hkv, S)

    def span_dims(self, name: str) -> tuple[int, ...]:
        """The axes of input `name` that are SPAN_AXIS in a span-axis graph (none otherwise)."""
        if not self.span_axis:
            return ()
        if name.startswith(("cache_k.", "cache_v.", "cache_k_scale.", "cache_v_scale.")):
            return (2,)
        return (1,) if name == "cache_positions" else ()

    def input_dtype(self, name: str) -> str:
        if name.startswith(("cache_k_scale.", "cache_v_scale.")):
            return "float32"
        return self.cache_dtype if name.startswith(("cache_k.", "cache_v.")) else "int64"

    def output_dtype(self, name: str) -> str:
        return self.cache_dtype if name in ("new_k", "new_v") else "float32"

    def output_shapes(self, chunk: int) -> dict[str, tuple[int, ...]]:
        new = (self.num_layers, self.batch, self.num_kv_heads, chunk, self.head_dim)
        scales = {name: new[:-1] for name in SCALE_OUTPUT_NAMES} if self.scaled_cache else {}
        return {"logits": (self.batch, chunk, self.vocab_size), "new_k": new, "new_v": new, **scales}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_config(cls, config, batch: int = 1, prefill_chunk: int | tuple[int, ...] = 16,
                   cache_slots: int | None = None, dtype: str | None = None, slide: bool = False,
                   span_axis: bool = False, kv_dtype: str | None = None) -> "StepShapes":
        """Shapes for a MixtralConfig; cache_slots defaults to the sliding window (or 4096 without);
        prefill_chunk is one length or several (each capped at cache_slots); span_axis as the graph has it."""
        if cache_slots is None:
            cache_slots = config.sliding_window or min(config.max_position_embeddings, 4096)
        lengths = (prefill_chunk,) if isinstance(prefill_chunk, int) else tuple(prefill_chunk)
        if not lengths:
            raise ContractError("prefill_chunk needs at least one length")
        lengths = tuple(min(t, cache_slots) for t in lengths)
        return cls(batch=batch, prefill_chunk=max(lengths), prefill_chunks=lengths, cache_slots=cache_slots,
                   num_layers=config.num_hidden_layers, num_kv_heads=config.num_key_value_heads,
                   head_dim=config.head_dim, vocab_size=config.vocab_size, dtype=dtype or config.dtype,
                   attention_window=resolve_window(config.sliding_window, cache_slots, slide), span_axis=span_axis, kv_dtype=kv_dtype)

    @classmethod
    def from_dict(cls, raw: dict) -> "StepShapes":
        return cls(**{**raw, "prefill_chunks": tuple(raw.get("prefill_chunks", ()))})


def layer_names(side: str, num_layers: int, first: int = 0) -> tuple[str, ...]:
    """`side`.i for the layers [first, first + num_layers): a stage's caches keep the model's layer numbers."""
    return tuple(f"{side}.{i}" for i in range(first, first + num_layers))


def layer_caches(cache_k, cache_v, scale_k=None, scale_v=None, first: int = 0) -> dict:
    """{"cache_k.i": cache_k[i - first], "cache_v.i": ...} (and an int8 cache's "cache_k_scale.i"...):
    views of (L, ...) arrays or tensors, never copies; `first`: the model's number of the first layer
    they hold (a pipeline stage's)."""
    scales = {} if scale_k is None else {**dict(zip(layer_names("cache_k_scale", len(scale_k), first), scale_k)),
                                         **dict(zip(layer_names("cache_v_scale", len(scale_v), first), scale_v))}
    return {**dict(zip(layer_names("cache_k", len(cache_k), first), cache_k)),
            **dict(zip(layer_names("cache_v", len(cache_v), first), cache_v)), **scales}


def resolve_window(sliding_window: int | None, cache_slots: int, slide: bool) -> int | None:
    """The attention window a build with `cache_slots` slots honours.

    With the config's sliding window W <= S the reference semantics hold exactly. A smaller ring,
    or a model without a window that should run past S tokens, changes what the model computes,
    so it needs the explicit `slide` opt-in and then attends to the last S positions.
    """
    if sliding_window is not None and sliding_window <= cache_slots:
        return sliding_window
    if slide:
        return cache_slots
    if sliding_window is not None:
        raise ContractError(f"cache_slots / --cache-slots ({cache_slots}) is smaller than the model's sliding_window "
                            f"({sliding_window}); pass slide=True / --slide to attend to the last "
                            f"{cache_slots} positions instead")
    return None


# ---- pipeline stages: a contiguous range of layers, each its own graph ----
#
# A staged artifact splits the step into N graphs chained in order. Stage i runs layers
# [first, stop) with its own ring cache; only the hidden state crosses from one stage to the next:
#
#   inputs   input_ids (B, T) int64 (stage 0) | hidden (B, T, H) the build's dtype (the others)
#            positions (B, T), cache_k.first .. cache_k.{stop-1}, cache_v.*, cache_positions (B, S)
#   outputs  hidden_out (B, T, H) the build's dtype (every stage but the last; the next stage's
#            hidden: ONNX names a graph's values once) | logits (B, T, V) float32
#            new_k, new_v (stop - first, B, Hkv, T, D)
#
# Stage 0 holds the embedding, the last the final norm and the LM head. Every stage keeps its own
# copy of cache_positions (B x S int64), written the same way by each, so none waits on another.

HIDDEN = "hidden"
HIDDEN_OUT = "hidden_out"


@dataclass(frozen=True)
class StageShapes:
    """One pipeline stage's contract: the whole step's shapes and which layers this stage runs."""

    step: StepShapes
    index: int
    count: int
    first_layer: int
    stop_layer: int
    hidden_size: int
    # False: stage 0 takes the embedded ids (hidden) too; the lookup reads the tied LM head's table,
    # which the last stage holds (a tied table split over two stages would be stored twice)
    embeds_ids: bool = True

    def __post_init__(self) -> None:
        for name in ("index", "count", "first_layer", "stop_layer", "hidden_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ContractError(f"stage {name} must be a non-negative integer, got {value!r}")
        if not 0 <= self.index < self.count or not 0 <= self.first_layer < self.stop_layer <= self.step.num_layers:
            raise ContractError(f"stage {self.index} of {self.count} with layers [{self.first_layer}, "
                                f"{self.stop_layer}) does not fit a model of {self.step.num_layers} layers")
        if self.step.kv_dtype is not None:
            raise ContractError(f"pipeline stages keep the cache in the build's dtype ({self.step.dtype}), "
                                f"not {self.step.kv_dtype}")
        if (self.index == 0) != (self.first_layer == 0) or \
                (self.index == self.count - 1) != (self.stop_layer == self.step.num_layers):
            raise ContractError(f"stage {self.index} of {self.count}: only the first stage starts at layer 0 "
                                f"and only the last ends at layer {self.step.num_layers}")

    @property
    def num_layers(self) -> int:
        return self.stop_layer - self.first_layer

    @property
    def embeds(self) -> bool:
        return self.index == 0 and self.embeds_ids

    @property
    def ends(self) -> bool:
        return self.index == self.count - 1

    @property
    def dtype(self) -> str:
        return self.step.dtype

    @property
    def chunks(self) -> tuple[int, ...]:
        return self.step.chunks

    @property
    def first_input(self) -> str:
        return "input_ids" if self.embeds else HIDDEN

    @property
    def last_output(self) -> str:
        return "logits" if self.ends else HIDDEN_OUT

    @property
    def output_names(self) -> tuple[str, ...]:
        return (self.last_output, "new_k", "new_v")

    def cache_shape(self, span: int | None = None) -> tuple[int, int, int, int, int]:
        """This stage's cache per side: (L_stage, B, Hkv, S, D), or a span of it (as the step's)."""
        return (self.num_layers, *self.step.cache_shape(span)[1:])

    @property
    def span_axis(self) -> bool:
        return self.step.span_axis

    def span_dims(self, name: str) -> tuple[int, ...]:
        return self.step.span_dims(name)

    @property
    def input_names(self) -> tuple[str, ...]:
        return (self.first_input, "positions", *layer_names("cache_k", self.num_layers, self.first_layer),
                *layer_names("cache_v", self.num_layers, self.first_layer), "cache_positions")

    def input_shapes(self, chunk: int, span: int | None = None) -> dict[str, tuple[int, ...]]:
        whole = self.step.input_shapes(chunk, span)
        first = whole["input_ids"] if self.embeds else (self.step.batch, chunk, self.hidden_size)
        return {name: first if name == self.first_input else whole.get(name, self.cache_shape(span)[1:])
                for name in self.input_names}

    def input_dtype(self, name: str) -> str:
        return self.dtype if name == HIDDEN else self.step.input_dtype(name)

    def output_shapes(self, chunk: int) -> dict[str, tuple[int, ...]]:
        new = (self.num_layers, *self.step.output_shapes(chunk)["new_k"][1:])
        last = (self.step.batch, chunk, self.step.vocab_size if self.ends else self.hidden_size)
        return {self.last_output: last, "new_k": new, "new_v": new}

    def output_dtype(self, name: str) -> str:
        return "float32" if name == "logits" else self.dtype

    def to_dict(self) -> dict:
        """What a stage manifest records beside the whole step's shapes."""
        return {"index": self.index, "count": self.count, "layers": [self.first_layer, self.stop_layer],
                "hidden_size": self.hidden_size, **({} if self.embeds_ids else {"embeds_ids": False})}

    @classmethod
    def from_dict(cls, step: StepShapes, raw: dict) -> "StageShapes":
        first, stop = raw["layers"]
        return cls(step=step, index=raw["index"], count=raw["count"], first_layer=first, stop_layer=stop,
                   hidden_size=raw["hidden_size"], embeds_ids=raw.get("embeds_ids", True))


# ---- head graphs: the non-generative heads, prefill only ----
#
# A head graph runs one static (B, T) batch with no cache:
#
#   inputs
#     input_ids        (B, T)   int64   token ids; padding columns hold pad_token_id (or anything without one)
#     attention_mask   (B, T)   int64   1 = token, 0 = padding (left, right or anywhere)
#   outputs (float32, whatever the build's dtype)
#     model                     last_hidden_state (B, T, H)   the final norm's output
#     sequence-classification   logits (B, N)                 score at the last non-padding token
#     token-classification      logits (B, T, N)              score at every token
#     question-answering        start_logits (B, T), end_logits (B, T)
#
# Token t sits at position t (column index), as transformers numbers a batch given no
# position_ids; a query sees keys q <= p within the sliding window that the mask marks as tokens.
# Outputs at padding columns are not defined (mask them). Sequence classification pools as
# transformers does: the rightmost column whose id is not pad_token_id, or the last column when
# the config has no pad_token_id (so such batches must be left-padded).

HEAD_KINDS = ("model", "sequence-classification", "token-classification", "question-answering")
CLASSIFIER_KINDS = ("sequence-classification", "token-classification")  # the heads with labels (id2label)
HEAD_INPUT_NAMES = ("input_ids", "attention_mask")
HEAD_OUTPUT_NAMES = {"model": ("last_hidden_state",), "sequence-classification": ("logits",),
                     "token-classification": ("logits",), "question-answering": ("start_logits", "end_logits")}


@dataclass(frozen=True)
class HeadShapes:
    """Static shapes of one head graph, fixed at build time."""

    head: str  # one of HEAD_KINDS
    batch: int
    seq_len: int
    hidden_size: int
    num_labels: int  # classification heads' label count; 2 for question answering (start, end); 0 for model
    dtype: str  # the weights'; every output is float32

    def __post_init__(self) -> None:
        if self.head not in HEAD_KINDS:
            raise ContractError(f"head {self.head!r} is not one of {', '.join(HEAD_KINDS)}")
        for name in ("batch", "seq_len", "hidden_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ContractError(f"{name} must be a positive integer, got {value!r}")
        want = {"model": 0, "question-answering": 2}.get(self.head)
        if (want is not None and self.num_labels != want) or (want is None and not (
                isinstance(self.num_labels, int) and self.num_labels > 0)):
            raise ContractError(f"num_labels {self.num_labels!r} does not fit the {self.head} head")
        if self.dtype not in FLOAT_DTYPES:
            raise ContractError(f"dtype {self.dtype!r} is not supported (one of {', '.join(FLOAT_DTYPES)})")

    @property
    def chunks(self) -> tuple[int, ...]:
        """The one sequence length the graph takes (the manifest's `chunks`, as for a step graph)."""
        return (self.seq_len,)

    @property
    def output_names(self) -> tuple[str, ...]:
        return HEAD_OUTPUT_NAMES[self.head]

    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        b, t = self.batch, self.seq_len
        return {"model": {"last_hidden_state": (b, t, self.hidden_size)},
                "sequence-classification": {"logits": (b, self.num_labels)},
                "token-classification": {"logits": (b, t, self.num_labels)},
                "question-answering": {"start_logits": (b, t), "end_logits": (b, t)}}[self.head]

    def io(self) -> dict:
        """{"inputs"|"outputs": [{"name", "dtype", "shape"}]}: what the manifest records and the graph must have."""
        inputs = [{"name": name, "dtype": "int64", "shape": [self.batch, self.seq_len]} for name in HEAD_INPUT_NAMES]
        outputs = [{"name": name, "dtype": "float32", "shape": list(shape)}
                   for name, shape in self.output_shapes().items()]
        return {"inputs": inputs, "outputs": outputs}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "HeadShapes":
        return cls(**raw)
