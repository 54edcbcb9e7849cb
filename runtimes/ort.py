"""The ONNX Runtime backend: one session over an artifact's step graph, the ring cache in numpy.

Serving needs no torch and no model code: the manifest says what the graph is, the graph is the
model. One InferenceSession serves every chunk length (each prefill chunk and T = 1), so the
weights are loaded once. Every buffer is allocated once: per chunk length an IOBinding binds the
token/position inputs and the three outputs to preallocated numpy arrays, and both bindings bind
each layer's cache_k.i/cache_v.i input to its view of the same (L, ...) cache arrays, and
cache_positions, zero-copy on CPU. A step copies the
tokens in, runs, and writes only the chunk's ring slots in place; the cache is never copied whole.
A graph with the span axis gets only the span of the ring in use (runtimes/span_ring.py): a short
context costs a short cache, whatever S.

Over a pipeline stage's folder (graphs/onnx_stages.py) the same class runs that stage: its first
input is the token ids (stage 0) or the previous stage's hidden state, its output the logits (the
last stage) or its own hidden state, its ring only its layers' (`run`; runtimes/pipeline.py chains them).
A stage may hold several rings (`groups`: docs/pipeline.md's row groups), one per group of the graph's
B rows, all served by the one session: the weights are loaded once, a run names its group.

With provider="cuda" the same host buffers are bound, so ORT uploads the cache every step:
correct, but a device-resident cache needs the ring write inside a graph.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mixtral_export.artifact.contract import DTYPES, NO_POSITION, SCALE_OUTPUT_NAMES, StageShapes, StepShapes
from mixtral_export.artifact.manifest import MANIFEST_NAME, Manifest, ManifestError, io_contract, load_manifest
from mixtral_export.errors import UserError
from mixtral_export.runtimes.resident_weights import anonymous_mappings, collapse_new_buffers, make_resident
from mixtral_export.runtimes.span_ring import SpanRing
from mixtral_export.runtimes.step import check_step_inputs

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "trt": "TensorrtExecutionProvider"}  # onnxruntime-gpu built with TensorRT; see runtimes/trt.py


class OrtBackendError(UserError, RuntimeError):
    """An artifact or provider this backend cannot serve; one line."""


def numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise OrtBackendError("bfloat16 artifacts need the ml_dtypes package (pip install ml_dtypes)") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(DTYPES[name].name)  # the contract's names are numpy's


def host_value(array: np.ndarray) -> ort.OrtValue:
    """An OrtValue over `array`'s own memory (no copy); bfloat16 by reinterpreting its bits."""
    if array.dtype.name == "bfloat16":
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), DTYPES["bfloat16"].onnx)
    return ort.OrtValue.ortvalue_from_numpy(array)


def session_options(threads: int | None, spin: bool) -> ort.SessionOptions:
    """Threads set deliberately: one intra-op pool over the usable cores, no inter-op pool, and no
    spin-waiting by default (spinning threads burn the cores the caller's own work needs)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    return options


def check_provider(manifest: Manifest, provider: str) -> str:
    """ONNX Runtime's name of `provider`, after checking it exists here and runs the artifact's dtype."""
    if provider not in PROVIDERS:
        raise OrtBackendError(f"provider {provider!r} is not supported (one of {', '.join(PROVIDERS)})")
    if provider == "cpu" and manifest.dtype == "bfloat16":
        raise OrtBackendError(f"{manifest.folder / MANIFEST_NAME}: bfloat16 graphs do not run on ONNX Runtime's "
                              f"CPU provider (no bf16 kernels); use provider='cuda' or export float32/float16")
    available = ort.get_available_providers()
    if PROVIDERS[provider] not in available:
        raise OrtBackendError(f"{PROVIDERS[provider]} is not available in this onnxruntime "
                              f"(available: {', '.join(available)})")
    return PROVIDERS[provider]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class ChunkBinding:
    """The IOBinding for one chunk length T: its own first-input/positions/output buffers, the shared cache."""

    def __init__(self, session: ort.InferenceSession, shapes: StepShapes | StageShapes, chunk: int,
                 dtype: np.dtype):
        first = shapes.input_names[0]  # input_ids (B, T), or a later stage's hidden (B, T, H)
        ins, out = shapes.input_shapes(chunk), shapes.output_shapes(chunk)
        self.first = np.zeros(ins[first], dtype=np.int64 if first == "input_ids" else dtype)
        self.positions = np.full(ins["positions"], NO_POSITION, dtype=np.int64)  # (B, T)
        last = shapes.output_names[0]
        self.output = np.zeros(out[last], dtype=np.float32 if last == "logits" else dtype)  # (B, T, V) | (B, T, H)
        self.new_k = np.zeros(out["new_k"], dtype=dtype)  # (L, B, Hkv, T, D)
        self.new_v = np.zeros(out["new_v"], dtype=dtype)  # (L, B, Hkv, T, D)
        # an int8 cache's scales of the chunk: (L, B, Hkv, T) each
        self.new_scales = tuple(np.zeros(out[name], np.float32) for name in SCALE_OUTPUT_NAMES if name in out)
        arrays = {first: self.first, "positions": self.positions,
                  last: self.output, "new_k": self.new_k, "new_v": self.new_v,
                  **dict(zip(SCALE_OUTPUT_NAMES, self.new_scales))}
        self.values = {name: host_value(array) for name, array in arrays.items()}  # kept alive
        self.binding = session.io_binding()
        for name in (first, "positions"):
            self.binding.bind_ortvalue_input(name, self.values[name])
        for name in shapes.output_names:
            self.binding.bind_ortvalue_output(name, self.values[name])
        self.layout = -1  # which of the ring's layouts (SpanRing.relayouts) the cache inputs view; -1: none yet
        self.session = session

    def bind_cache(self, cache: dict[str, np.ndarray], layout: int) -> None:
        """Bind each layer's cache view and cache_positions (a span of the ring: artifact/contract.py)."""
        for name, array in cache.items():
            self.values[name] = host_value(array)
            self.binding.bind_ortvalue_input(name, self.values[name])
        self.layout = layout

    def run(self, first: np.ndarray, positions: np.ndarray) -> None:
        np.copyto(self.first, first)
        np.copyto(self.positions, positions)
        self.session.run_with_iobinding(self.binding)


class OrtBackend:
    """StepBackend over an ONNX artifact folder (see graphs/onnx_export.py)."""

    name = "ort"

    def __init__(self, artifact_dir: str | Path, provider: str = "cpu", threads: int | None = None,
                 verify_files: bool = True, spin: bool = False, preload: bool = True, spans: bool = True,
                 groups: int = 1):
        """spans=False passes the whole ring every step even to a span-axis graph (the baseline);
        groups: rings of the graph's B rows each, row r of `reset` in ring r // B (a pipeline stage's)."""
        self.manifest: Manifest = load_manifest(artifact_dir, verify_files=verify_files)
        if self.manifest.kind != "onnx":
            raise OrtBackendError(f"{self.manifest.folder / MANIFEST_NAME}: a {self.manifest.kind!r} artifact, "
                                  f"not an ONNX one")
        if self.manifest.stages:
            raise OrtBackendError(f"{self.manifest.folder / MANIFEST_NAME}: a staged artifact; open it as a "
                                  f"pipeline (runtimes/pipeline.py), which runs one OrtBackend per stage")
        self.contract = self.manifest.contract  # the whole step, or one stage of it
        provider_name = check_provider(self.manifest, provider)
        self.provider = provider
        self.shapes: StepShapes = self.manifest.shapes
        before = anonymous_mappings() if preload else set()
        self.session = ort.InferenceSession(str(self.manifest.graph_path("step")), session_options(threads, spin),
                                            providers=[provider_name])
        check_session_io(self.session, self.manifest)
        data_files = [self.manifest.path(name) for name in self.manifest.files if name.endswith(".data")]
        # see runtimes/resident_weights.py: mapped weights paged in, on huge pages where the kernel can
        self.resident_bytes = make_resident(data_files) if preload else 0
        self.huge_page_bytes = (collapse_new_buffers(before, prepacked_sizes(self.manifest))
                                if preload and provider == "cpu" else 0)

        # see runtimes/span_ring.py: a step passes the span of the ring in use when the graph takes one
        first_layer = self.manifest.stage.first_layer if self.manifest.stage else 0  # a stage's: its first
        self.rings = [SpanRing(self.shapes, numpy_dtype(self.shapes.cache_dtype), spans=spans and self.shapes.span_axis,
                               num_layers=self.contract.cache_shape()[0], first_layer=first_layer)
                      for _ in range(groups)]
        self.ring = self.rings[0]
        # per group and chunk length: its own buffers bound to its ring's views
        self.group_bindings = [{chunk: ChunkBinding(self.session, self.contract, chunk, ring.flat_k.dtype)
                                for chunk in self.manifest.chunks} for ring in self.rings]
        self.bindings = self.group_bindings[0]

    @property
    def cache_k(self) -> np.ndarray:
        return self.ring.cache_k  # (L, B, Hkv, s, D)

    @property
    def cache_v(self) -> np.ndarray:
        return self.ring.cache_v  # (L, B, Hkv, s, D)

    @property
    def cache_positions(self) -> np.ndarray:
        return self.ring.cache_positions  # (B, s)

    @property
    def span(self) -> int:
        """The cache slots the last step passed (S without the span axis)."""
        return self.ring.span

    def reset(self, rows=None) -> None:
        """Empty `rows` (every row when None); with several groups row r is row r % B of ring r // B."""
        if rows is None:
            for ring in self.rings:
                ring.reset()
            return
        batch = self.shapes.batch
        for group, ring in enumerate(self.rings):
            mine = [row % batch for row in rows if row // batch == group]
            if mine:
                ring.reset(mine)

    def step(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        check_step_inputs(self.shapes, self.shapes.vocab_size, input_ids, positions)
        return self.run(input_ids, positions)

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """(B, T) ids -> (B, T, H) embeddings, read from the tied LM head's table this stage's graph holds
        (manifest.table: its (H, V) bytes in the data file), for a first stage without the table."""
        table = self.manifest.table
        if table is None:
            raise OrtBackendError(f"{self.manifest.folder / MANIFEST_NAME}: this stage holds no embedding table")
        if getattr(self, "_table", None) is None:
            self._table = np.memmap(self.manifest.path(table["file"]), dtype=numpy_dtype(self.shapes.dtype),
                                    mode="r", offset=table["offset"], shape=tuple(table["shape"]))  # (H, V)
        return np.ascontiguousarray(self._table[:, input_ids].transpose(1, 2, 0))  # (H, B, T) -> (B, T, H)

    def run(self, first: np.ndarray, positions: np.ndarray, group: int = 0) -> np.ndarray:
        """One chunk through the graph, inputs unchecked (`step` checks; a pipeline checks once for
        all its stages): first is the ids (B, T) or a stage's hidden state (B, T, H); returns the
        logits (B, T, V) or this stage's hidden state (B, T, H), and writes ring `group`."""
        positions = np.asarray(positions, dtype=np.int64)
        ring = self.rings[group]
        ring.fit(ring.span_needed(positions))
        chunk = self.group_bindings[group][first.shape[1]]
        if chunk.layout != ring.relayouts:  # views of the ring's buffers, zero-copy
            chunk.bind_cache(ring.inputs(), ring.relayouts)
        chunk.run(first, positions)
        ring.write(chunk.new_k, chunk.new_v, positions, chunk.new_scales or None)
        return chunk.output.copy()  # the buffer is overwritten by the next step


def prepacked_sizes(manifest: Manifest) -> set[int]:
    """The byte sizes of the copies ONNX Runtime makes of the graph's float MatMul weights at load
    (MLAS's prepacked B: the weight's own bytes, as stored or as float32): the lm_head and the
    attention projections (fused q/k/v too). Quantized ones are packed otherwise and not named."""
    config = manifest.config
    h, d, kv = config.hidden_size, config.head_dim, config.num_key_value_heads * config.head_dim
    q = config.num_attention_heads * d
    weights = {"lm_head": h * config.vocab_size, "q_proj": h * q, "k_proj": h * kv, "v_proj": h * kv,
               "o_proj": q * h, "qkv": h * (q + 2 * kv)}
    quantized = (manifest.quantization or {}).get("tensors", ())
    floats = [count for name, count in weights.items() if not any(f"{name}." in tensor for tensor in quantized)]
    return {count * item for count in floats for item in {numpy_dtype(manifest.dtype).itemsize, 4}}


def check_session_io(session: ort.InferenceSession, manifest: Manifest) -> None:
    """The loaded graph has the manifest's I/O: names in order, element types, static dims."""
    path = manifest.graph_path("step")
    contract = io_contract(manifest.contract, manifest.chunks)
    for side, values in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        names = [v.name for v in values]
        want_names = [e["name"] for e in contract[side]]
        if names != want_names:
            raise ManifestError(f"{path}: graph {side} are {names}, the manifest says {want_names}")
        for value, want in zip(values, contract[side]):
            for chunk, dims in want["shapes"].items():
                fits = len(value.shape) == len(dims) and all(
                    not isinstance(got, int) or got == d for got, d in zip(value.shape, dims))
                if value.type != DTYPES[want["dtype"]].ort or not fits:
                    raise ManifestError(f"{path}: {value.name} is {value.type} {value.shape}, the manifest "
                                        f"says {want['dtype']} {dims} for T={chunk}")
