"""The torch.compile backend: MixtralStatic and its ring write compiled into one step per chunk length.

`RingStep` holds the ring cache as module buffers and does attend-then-write in one forward, so
the compiled graph owns the whole step: the host sends one (3, B, T) int64 tensor (token ids,
positions, ring slots) and gets the logits back. Slots are computed on the host with the same
`ring_writes` rule as every backend; padding tokens (position -1) write into one extra dummy slot
S that the model never reads, which keeps the write a fixed-size scatter with no branch on values.
With static shapes and in-place buffer writes, `mode="reduce-overhead"` on CUDA can replay the
whole decode step as a CUDA graph (the buffers are static addresses; cudagraph trees allow their
mutation).

Spans (artifact/contract.py): the step attends over the smallest span bucket holding every row's
positions, as the eager and ONNX backends do: the buffers keep all S + 1 slots and the compiled
step reads the view of their first s; slots past a row's extent are empty and masked, so the logits
are the whole ring's. The span reaches the graph as the length of a marker tensor marked dynamic
(`torch._dynamo.maybe_mark_dynamic`), so one graph per chunk length serves the spans, and Inductor
adds a recompile only where its code must change with the size (on the tiny model: a guard
s + T <= 4096, so a ring above 4096 slots compiles a second graph per chunk length the first time a
span passes it). Compiling per (chunk, span bucket) instead measured 15-40 s per bucket on the tiny
model (2 loaded cores): 2 x 9 compiles for a 16384-slot ring, each a stall the first time a sequence
grows into a bucket. On CUDA, cudagraph trees record one graph per span bucket met. `spans=False`
runs the same graph over all S slots every step (the baseline).

Compilation: `torch.compile(fullgraph=True, dynamic=False)`, static but for the span: each chunk
length (prefill chunks and T = 1) compiles once, plus once per size regime Inductor's guards split
the spans into (`compile_count` counts backend invocations: len(chunks) for a whole generation over
spans below those sizes). `isolate_recompiles=True` gives each backend instance its own Dynamo cache
entries (instances would otherwise share RingStep.forward's, and their limit), and
`recompile_limit` = len(chunks) x the span buckets (what compiling per bucket would cost at worst)
turns any further compile into an error (FailOnRecompileLimitHit) instead of a silent slowdown.
`compile_seconds[T]` is the wall time of the first call of each chunk length (tracing, Inductor
and the run itself); `run_seconds` / `run_steps` cover the steps after `warmup`.

Caches: torch 2.13 has Inductor's FX graph cache and AOTAutograd's cache on by default
(`torch._inductor.config.fx_graph_cache`, `torch._functorch.config.enable_autograd_cache`), kept
in TORCHINDUCTOR_CACHE_DIR (default /tmp/torchinductor_$USER). A later process still re-traces
with Dynamo, but a cache hit skips Inductor's codegen and the C++/Triton compile: on the tiny
model (2 CPU cores) both chunk lengths take ~30 s cold and ~3 s from a warm cache.
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from mixtral_export.artifact.contract import NO_POSITION, StepShapes
from mixtral_export.model import TORCH_DTYPES, MixtralStatic
from mixtral_export.runtimes.step import check_step_inputs, ring_writes
from mixtral_export.runtimes.torch_ring import clear


class CountingInductor(torch._TorchCompileInductorWrapper):
    """The backend `torch.compile(mode=...)` builds for Inductor, counting the graphs it compiles."""

    def __init__(self, mode: str):
        super().__init__(mode, None, False)
        self.count = 0

    def __call__(self, model_, inputs_, *, config_patches=None):
        self.count += 1
        return super().__call__(model_, inputs_, config_patches=config_patches)


class RingStep(nn.Module):
    """One step with its cache as buffers: attend to the cache, then write the chunk's ring slots."""

    def __init__(self, model: MixtralStatic, shapes: StepShapes):
        super().__init__()
        self.model = model
        self.slots = shapes.cache_slots
        layers, batch, heads, slots, dim = shapes.cache_shape()
        dtype = TORCH_DTYPES[shapes.dtype]
        # One more slot than the ring: slot S is where padding tokens write; nothing reads it.
        self.register_buffer("cache_k", torch.zeros(layers, batch, heads, slots + 1, dim, dtype=dtype))
        self.register_buffer("cache_v", torch.zeros(layers, batch, heads, slots + 1, dim, dtype=dtype))
        self.register_buffer("cache_positions", torch.full((batch, slots + 1), NO_POSITION, dtype=torch.int64))

    def forward(self, tokens: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
        """tokens (3, B, T): ids, positions, ring slots; span (s,): its length is the slots attended over."""
        ids, positions, slots = tokens.unbind(0)  # each (B, T)
        s = span.shape[0]
        logits, new_k, new_v = self.model(ids, positions, self.cache_k[:, :, :, :s], self.cache_v[:, :, :, :s],
                                          self.cache_positions[:, :s])  # new_k/v: (L, B, Hkv, T, D)
        # index_put_, not scatter_: Inductor writes it in place, while scatter_ on a buffer compiled to a
        # copy of the whole ring every step (13.8 against 0.46 ms per tiny decode step at S = 16384)
        rows = torch.arange(slots.shape[0], device=slots.device)[:, None].expand_as(slots)  # (B, T)
        self.cache_k[:, rows, :, slots] = new_k.permute(1, 3, 0, 2, 4)  # (B, T, L, Hkv, D)
        self.cache_v[:, rows, :, slots] = new_v.permute(1, 3, 0, 2, 4)
        self.cache_positions[rows, slots] = positions
        return logits  # (B, T, V)


class CompiledBackend:
    """StepBackend over torch.compile; mode defaults to "reduce-overhead" on CUDA, "default" elsewhere."""

    name = "compiled"

    def __init__(self, model: MixtralStatic, shapes: StepShapes, device: str | torch.device = "cpu",
                 mode: str | None = None, spans: bool = True):
        if model.attention_window != shapes.attention_window:
            raise ValueError(f"model attends to {model.attention_window} positions, "
                             f"shapes say {shapes.attention_window}")
        self.shapes = shapes
        self.device = torch.device(device)
        self.mode = mode or ("reduce-overhead" if self.device.type == "cuda" else "default")
        self.ring = RingStep(model.eval(), shapes).to(self.device)
        for buffer in self.ring.buffers():
            torch._dynamo.mark_static_address(buffer)
        self.backend = CountingInductor(self.mode)
        # the compiled model takes any span, whatever an artifact's graph does (as the eager backend)
        self.buckets = replace(shapes, span_axis=spans)
        limit = len(shapes.chunks) * len(replace(shapes, span_axis=True).span_buckets)
        self.compiled = torch.compile(self.ring, backend=self.backend, fullgraph=True, dynamic=False,
                                      isolate_recompiles=True, recompile_limit=limit)
        self.markers = {s: self.span_marker(s) for s in self.buckets.span_buckets}
        self.extent = np.zeros(shapes.batch, dtype=np.int64)  # (B,) each row's highest position + 1
        self.span = self.buckets.span_buckets[0]  # the slots the last step attended over
        self.cudagraphs = bool(self.backend.config.get("triton.cudagraphs", False))
        self.compile_seconds: dict[int, float] = {}  # chunk length -> first call's wall time
        self.run_seconds = 0.0
        self.run_steps = 0

    def span_marker(self, span: int) -> torch.Tensor:
        """A (span,) tensor whose length tells the step how many slots to attend over: a symbolic size
        where a ring has several buckets, so one graph serves them (spans=False runs the same graph at S)."""
        marker = torch.empty(span, dtype=torch.int8, device=self.device)  # (s,), values unused
        if len(replace(self.shapes, span_axis=True).span_buckets) > 1:
            # maybe_: Inductor's own size guards (s + T <= 4096) then recompile instead of refusing the range
            torch._dynamo.maybe_mark_dynamic(marker, 0)
        return marker

    @property
    def compile_count(self) -> int:
        return self.backend.count

    def reset(self, rows=None) -> None:
        """Empty `rows` (all when None): only the slots below the longest extent were ever written (all S
        once a row wraps), so only those are cleared, not a whole 16384-slot ring per request."""
        s, ring = min(int(self.extent.max()), self.shapes.cache_slots), self.ring
        clear(ring.cache_k[:, :, :, :s], ring.cache_v[:, :, :, :s], ring.cache_positions[:, :s], rows)
        self.extent[slice(None) if rows is None else list(rows)] = 0

    def warmup(self) -> None:
        """Compile (and on CUDA record) every chunk length with all-padding steps over the current span;
        the cache is untouched."""
        for chunk in self.shapes.chunks:
            empty = np.full((self.shapes.batch, chunk), NO_POSITION, dtype=np.int64)
            for _ in range(3):  # cudagraph trees warm up, then record, then replay
                self.step(np.zeros_like(empty), empty)
        self.run_seconds, self.run_steps = 0.0, 0

    @torch.no_grad()
    def step(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        check_step_inputs(self.shapes, self.shapes.vocab_size, input_ids, positions)
        positions = np.asarray(positions, dtype=np.int64)
        slots = np.full(positions.shape, self.shapes.cache_slots, dtype=np.int64)  # padding -> dummy slot S
        rows, cols, ring = ring_writes(positions, self.shapes.cache_slots)
        slots[rows, cols] = ring
        tokens = torch.from_numpy(np.stack((input_ids.astype(np.int64), positions, slots)))  # (3, B, T)
        np.maximum.at(self.extent, rows, positions[rows, cols] + 1)
        self.span = self.buckets.span_for(int(self.extent.max()))  # every row's slots after the step
        chunk = input_ids.shape[1]
        start = time.perf_counter()
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are already on the host
        logits = self.compiled(tokens.to(self.device), self.markers[self.span]).cpu().numpy()
        elapsed = time.perf_counter() - start
        if chunk not in self.compile_seconds:
            self.compile_seconds[chunk] = elapsed
        else:
            self.run_seconds += elapsed
            self.run_steps += 1
        return logits
