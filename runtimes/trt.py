"""The TensorRT backend: an artifact's engine.plan, the ring cache in GPU memory.

torch is the device allocator: the cache and every I/O buffer are CUDA tensors, allocated once
(cache k/v/positions shared; per chunk length T its own ids/positions/logits/new-k/new-v), and
torch's indexing does the ring writes on the device. Each chunk length has its own execution
context; graphs/trt_engine.py builds one exact profile per (T, span bucket), and the context is
switched to the profile of the step's span (artifact/engine_record.py: `profile_for`) with the
input shapes and tensor addresses bound again only when the span changes. The ring is laid out so
each layer's span is contiguous (runtimes/torch_ring.py), the span the smallest bucket holding every
row's positions, as on every backend (artifact/contract.py: spans); an engine recorded before spans
has one whole-ring profile per T and gets the whole ring. A step copies the tokens up, re-lays the
ring out if its span changes, runs the context on the backend's one CUDA stream
(`execute_async_v3`), writes the chunk's keys/values into their ring slots on that stream (the
cache never visits the host) and copies the logits down.

Before TensorRT loads anything, the manifest's record of the engine must name this machine's
TensorRT version and GPU (check_engine_record): a stale engine is refused with one line, not a
TensorRT crash.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mixtral_export.artifact.contract import NO_POSITION, OUTPUT_NAMES, StepShapes, layer_caches
from mixtral_export.artifact.engine_record import (
    ENGINE_NAME, check_engine_record, engine_spans, gpu_identity, import_tensorrt, profile_count, profile_for,
)
from mixtral_export.artifact.manifest import MANIFEST_NAME, Manifest, ManifestError, io_contract, load_manifest
from mixtral_export.errors import UserError
from mixtral_export.runtimes.step import check_step_inputs
from mixtral_export.runtimes.torch_ring import TorchRing


class TrtBackendError(UserError, RuntimeError):
    """An engine this backend cannot run; one line naming the file."""


class ChunkContext:
    """One chunk length T: an execution context, its buffers allocated once, bound to a span's profile."""

    def __init__(self, engine, profiles: dict, shapes: StepShapes, chunk: int, device: torch.device, where: Path):
        out = shapes.output_shapes(chunk)
        dtype = getattr(torch, shapes.dtype)
        self.input_ids = torch.zeros((shapes.batch, chunk), dtype=torch.int64, device=device)  # (B, T)
        self.positions = torch.full((shapes.batch, chunk), NO_POSITION, dtype=torch.int64, device=device)  # (B, T)
        self.logits = torch.zeros(out["logits"], dtype=torch.float32, device=device)  # (B, T, V)
        self.new_k = torch.zeros(out["new_k"], dtype=dtype, device=device)  # (L, B, Hkv, T, D)
        self.new_v = torch.zeros_like(self.new_k)  # (L, B, Hkv, T, D)
        self.host_logits = torch.zeros(out["logits"], dtype=torch.float32, pin_memory=True)  # (B, T, V)
        self.context = engine.create_execution_context()
        if self.context is None:
            raise TrtBackendError(f"{where}: cannot open an execution context (T={chunk})")
        self.profiles, self.shapes, self.chunk, self.where = profiles, shapes, chunk, where
        self.span = None  # the span whose profile, shapes and addresses are bound

    def bind(self, span: int, cache: dict[str, torch.Tensor], stream: torch.cuda.Stream) -> None:
        """Switch to the profile of `span` slots and bind the ring's views of that span (no-op if bound)."""
        if span == self.span:
            return
        profile = profile_for(self.profiles, self.chunk, span, self.shapes.cache_slots)
        tensors = {"input_ids": self.input_ids, "positions": self.positions, **cache,
                   "logits": self.logits, "new_k": self.new_k, "new_v": self.new_v}
        if not self.context.set_optimization_profile_async(profile, stream.cuda_stream):
            raise TrtBackendError(f"{self.where}: cannot switch to profile {profile} (T={self.chunk}, {span} slots)")
        for name in self.shapes.input_names:
            if not self.context.set_input_shape(name, tuple(tensors[name].shape)):
                raise TrtBackendError(f"{self.where}: profile {profile} does not take {name} "
                                      f"{tuple(tensors[name].shape)} (T={self.chunk}, {span} slots)")
        for name in OUTPUT_NAMES:
            got = tuple(self.context.get_tensor_shape(name))
            if got != tuple(tensors[name].shape):
                raise TrtBackendError(f"{self.where}: {name} comes out {got} for T={self.chunk}, the contract says "
                                      f"{tuple(tensors[name].shape)}")
        for name, tensor in tensors.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        self.span = span

    def run(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise TrtBackendError(f"{self.where}: TensorRT failed to enqueue the step (its log says why)")


class TrtBackend:
    """StepBackend over an ONNX artifact folder holding an engine built by graphs/trt_engine.py."""

    name = "trt"

    def __init__(self, artifact_dir: str | Path, engine: str = ENGINE_NAME, verify_files: bool = True):
        self.manifest: Manifest = load_manifest(artifact_dir, verify_files=verify_files)
        path = self.manifest.folder / engine
        record = self.manifest.engines.get(engine)
        if record is None:
            raise TrtBackendError(f"{path}: no TensorRT engine in {MANIFEST_NAME}; build one on this machine with "
                                  f"`mixtral-export build-engine {self.manifest.folder}`")
        trt = import_tensorrt()
        check_engine_record(record, trt.__version__, *gpu_identity(), where=path)
        self.shapes: StepShapes = self.manifest.shapes
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise TrtBackendError(f"{path}: TensorRT could not load the engine (its log above says why)")
        check_engine_io(trt, self.engine, self.manifest, record, path)

        spans = engine_spans(record["profiles"], self.shapes.chunks[0], self.shapes.cache_slots)
        self.ring = TorchRing(self.shapes, self.device, spans=len(spans) > 1)
        self.chunks = {chunk: ChunkContext(self.engine, record["profiles"], self.shapes, chunk, self.device, path)
                       for chunk in self.shapes.chunks}
        with torch.cuda.stream(self.stream):
            for context in self.chunks.values():
                context.bind(self.ring.span, self.cache_views(), self.stream)  # fails here, not mid-step
        torch.cuda.synchronize(self.device)  # profile switches and zero fills are done before the first step

    @property
    def span(self) -> int:
        """The cache slots the last step passed (S for an engine recorded before spans)."""
        return self.ring.span

    def cache_views(self) -> dict[str, torch.Tensor]:
        """Each layer's keys and values and the positions over the ring's current span, contiguous views."""
        return {**layer_caches(self.ring.cache_k, self.ring.cache_v), "cache_positions": self.ring.cache_positions}

    def reset(self, rows=None) -> None:
        with torch.cuda.stream(self.stream):
            self.ring.reset(rows)
        self.stream.synchronize()

    @torch.inference_mode()
    def step(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        check_step_inputs(self.shapes, self.shapes.vocab_size, input_ids, positions)
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        chunk = self.chunks[input_ids.shape[1]]
        with torch.cuda.stream(self.stream):
            self.ring.fit(self.ring.span_needed(positions))  # a re-layout on the stream, before the step reads it
            chunk.bind(self.ring.span, self.cache_views(), self.stream)
            chunk.input_ids.copy_(torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)))
            chunk.positions.copy_(torch.from_numpy(positions))
            chunk.run(self.stream)
            self.ring.write(chunk.new_k, chunk.new_v, positions)
            chunk.host_logits.copy_(chunk.logits, non_blocking=True)
        self.stream.synchronize()
        return chunk.host_logits.numpy().copy()  # the pinned buffer is overwritten by the next step


def check_engine_io(trt, engine, manifest: Manifest, record: dict, path: Path) -> None:
    """The engine has the contract's tensors (names, directions, types) and one profile per chunk length."""
    types = {"float32": trt.DataType.FLOAT, "float16": trt.DataType.HALF, "bfloat16": trt.DataType.BF16,
             "int64": trt.DataType.INT64}
    contract = io_contract(manifest.shapes, manifest.chunks)
    want = {entry["name"]: (mode, types[entry["dtype"]])
            for mode, side in ((trt.TensorIOMode.INPUT, "inputs"), (trt.TensorIOMode.OUTPUT, "outputs"))
            for entry in contract[side]}
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    if sorted(names) != sorted(want):
        raise ManifestError(f"{path}: the engine's tensors are {names}, the manifest says {list(want)}")
    for name in names:
        got = (engine.get_tensor_mode(name), engine.get_tensor_dtype(name))
        if got != want[name]:
            raise ManifestError(f"{path}: {name} is {got[0]} {got[1]} in the engine, the manifest says "
                                f"{want[name][0]} {want[name][1]}")
    check_profile_record(record["profiles"], engine.num_optimization_profiles, manifest.shapes, path)


def check_profile_record(profiles: dict, engine_profiles: int, shapes: StepShapes, path: Path) -> None:
    """The record lists a profile for every chunk length the artifact serves, the same spans for each (the
    contract's span buckets, or just S for an engine from before spans), and as many as the engine has."""
    slots = shapes.cache_slots
    spans = {int(t): engine_spans(profiles, int(t), slots) for t in profiles}
    if sorted(spans) != sorted(shapes.chunks) or profile_count(profiles) != engine_profiles:
        raise ManifestError(f"{path}: the engine has {engine_profiles} profiles for T in {sorted(spans)}, the "
                            f"artifact serves T in {sorted(shapes.chunks)}")
    for chunk, found in spans.items():
        if found not in (shapes.span_buckets, (slots,)) or found != spans[shapes.chunks[0]]:
            raise ManifestError(f"{path}: the engine's profiles for T={chunk} take spans {list(found)}, the "
                                f"artifact's are {list(shapes.span_buckets)}")
