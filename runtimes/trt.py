"""The TensorRT backend: an artifact's engine.plan, the ring cache in GPU memory.

torch is the device allocator: the cache and every I/O buffer are CUDA tensors, allocated once
(cache k/v/positions shared; per chunk length T its own ids/positions/logits/new-k/new-v), and
torch's indexing does the ring writes on the device. Each chunk length has its own execution
context on its own optimization profile (graphs/trt_engine.py builds profile per T), with input
shapes and tensor addresses bound once. A step copies the tokens up, runs the context on the
backend's one CUDA stream (`execute_async_v3`), writes the chunk's keys/values into their ring
slots on that stream (the cache never visits the host) and copies the logits down.

Before TensorRT loads anything, the manifest's record of the engine must name this machine's
TensorRT version and GPU (check_engine_record): a stale engine is refused with one line, not a
TensorRT crash.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mixtral_export.artifact.contract import NO_POSITION, OUTPUT_NAMES, StepShapes, layer_caches
from mixtral_export.artifact.engine_record import ENGINE_NAME, check_engine_record, gpu_identity, import_tensorrt
from mixtral_export.artifact.manifest import MANIFEST_NAME, Manifest, ManifestError, io_contract, load_manifest
from mixtral_export.errors import UserError
from mixtral_export.runtimes.step import check_step_inputs
from mixtral_export.runtimes.torch_ring import TorchRing


class TrtBackendError(UserError, RuntimeError):
    """An engine this backend cannot run; one line naming the file."""


class ChunkContext:
    """One chunk length T: an execution context on its profile, its buffers allocated and bound once."""

    def __init__(self, engine, profile: int, shapes: StepShapes, chunk: int, cache: dict[str, torch.Tensor],
                 stream: torch.cuda.Stream, where: Path):
        device = cache["cache_positions"].device
        out = shapes.output_shapes(chunk)
        self.input_ids = torch.zeros((shapes.batch, chunk), dtype=torch.int64, device=device)  # (B, T)
        self.positions = torch.full((shapes.batch, chunk), NO_POSITION, dtype=torch.int64, device=device)  # (B, T)
        self.logits = torch.zeros(out["logits"], dtype=torch.float32, device=device)  # (B, T, V)
        self.new_k = torch.zeros(out["new_k"], dtype=cache["cache_k.0"].dtype, device=device)  # (L, B, Hkv, T, D)
        self.new_v = torch.zeros_like(self.new_k)  # (L, B, Hkv, T, D)
        self.host_logits = torch.zeros(out["logits"], dtype=torch.float32, pin_memory=True)  # (B, T, V)
        self.tensors = {"input_ids": self.input_ids, "positions": self.positions, **cache,
                        "logits": self.logits, "new_k": self.new_k, "new_v": self.new_v}
        self.context = engine.create_execution_context()
        if self.context is None or not self.context.set_optimization_profile_async(profile, stream.cuda_stream):
            raise TrtBackendError(f"{where}: cannot open an execution context on profile {profile} (T={chunk})")
        for name in shapes.input_names:
            if not self.context.set_input_shape(name, tuple(self.tensors[name].shape)):
                raise TrtBackendError(f"{where}: profile {profile} does not take {name} "
                                      f"{tuple(self.tensors[name].shape)} (T={chunk})")
        for name in OUTPUT_NAMES:
            got = tuple(self.context.get_tensor_shape(name))
            if got != tuple(self.tensors[name].shape):
                raise TrtBackendError(f"{where}: {name} comes out {got} for T={chunk}, the contract says "
                                      f"{tuple(self.tensors[name].shape)}")
        for name, tensor in self.tensors.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        self.where = where

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

        self.ring = TorchRing(self.shapes, self.device)
        cache = {**layer_caches(self.ring.cache_k, self.ring.cache_v),  # per-layer views of the ring
                 "cache_positions": self.ring.cache_positions}
        self.chunks = {int(chunk): ChunkContext(self.engine, profile, self.shapes, int(chunk), cache, self.stream, path)
                       for chunk, profile in record["profiles"].items()}
        torch.cuda.synchronize(self.device)  # profile switches and zero fills are done before the first step

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
    if sorted(int(t) for t in record["profiles"]) != sorted(manifest.chunks) or \
            engine.num_optimization_profiles != len(record["profiles"]):
        raise ManifestError(f"{path}: the engine has {engine.num_optimization_profiles} profiles for "
                            f"{sorted(record['profiles'])}, the artifact serves T in {sorted(manifest.chunks)}")
