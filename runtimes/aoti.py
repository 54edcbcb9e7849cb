"""The AOTInductor backend: an artifact's compiled step models, the ring cache in torch tensors.

Serving needs torch but no model code: the manifest says what the package is, the package is the
model. The weights file is loaded once onto the device and handed to both chunk models without a
copy (`load_constants(user_managed=True)`); the cache lives in torch tensors that every call
reads, and a step writes only the chunk's ring slots, like the eager backend.

Spans (artifact/contract.py): a package exported with the span axis takes any span of slots, so a
step passes the smallest span bucket holding every row's positions; the ring is laid out so each
layer's span is contiguous (runtimes/torch_ring.py), since a compiled model reads its inputs with
the strides it was traced with. Older packages (no span axis) get the whole ring.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mixtral_export.artifact.contract import StepShapes, layer_caches
from mixtral_export.artifact.manifest import Manifest, ManifestError, load_manifest
from mixtral_export.runtimes.step import check_step_inputs
from mixtral_export.runtimes.torch_ring import TorchRing
ALIASES_KEY = "aliases"  # graphs.aoti_export writes tied parameters' extra names here


class AotiBackend:
    """StepBackend over an AOTI artifact folder (see graphs/aoti_export.py)."""

    name = "aoti"

    def __init__(self, artifact_dir: str | Path, device: str | torch.device = "cpu", verify_files: bool = True,
                 spans: bool = True):
        """spans=False passes the whole ring every step even to a span-axis package (the baseline)."""
        self.manifest: Manifest = load_manifest(artifact_dir, verify_files=verify_files)
        self.device = torch.device(device)
        check_runnable_here(self.manifest, self.device)
        self.shapes: StepShapes = self.manifest.shapes
        dtype = getattr(torch, self.shapes.dtype)
        weights = load_weights(self.manifest.graph_path("weights"), self.device, dtype)
        self.runners = {chunk: load_runner(self.manifest, chunk, self.device, weights)
                        for chunk in self.manifest.chunks}
        self.weights = weights  # user-managed constants: the runners hold raw pointers into these
        self.ring = TorchRing(self.shapes, self.device, spans=spans and self.shapes.span_axis)

    @property
    def span(self) -> int:
        """The cache slots the last step passed (S without the span axis)."""
        return self.ring.span

    def reset(self, rows=None) -> None:
        self.ring.reset(rows)

    @torch.inference_mode()
    def step(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        check_step_inputs(self.shapes, self.shapes.vocab_size, input_ids, positions)
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.device)
        pos = torch.from_numpy(positions).to(self.device)
        runner = self.runners[input_ids.shape[1]]
        ring = self.ring
        ring.fit(ring.span_needed(positions))
        caches = layer_caches(ring.cache_k, ring.cache_v)  # per-layer contiguous views of the span, in input order
        logits, new_k, new_v = runner.run([ids, pos, *caches.values(), ring.cache_positions])
        ring.write(new_k, new_v, positions)
        return logits.cpu().numpy()


def check_runnable_here(manifest: Manifest, device: torch.device) -> None:
    """Refuse what this process cannot run: another kind, another device, another torch build."""
    path = manifest.folder / "manifest.json"
    if manifest.kind != "aoti":
        raise ManifestError(f"{path}: a {manifest.kind!r} artifact, not an AOTI one")
    if manifest.device != device.type:
        raise ManifestError(f"{path}: compiled for {manifest.device!r}, asked to run on {device.type!r}")
    built = manifest.tools.get("torch")
    if built != torch.__version__:
        raise ManifestError(f"{path}: built with torch {built}, this is torch {torch.__version__} "
                            f"(AOTI packages are tied to the libtorch that built them; rebuild it)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ManifestError(f"{path}: a CUDA artifact, but this torch sees no CUDA GPU")


def load_weights(path: Path, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """name -> tensor on `device`, tied aliases resolved to the same tensor."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            weights = {name: handle.get_tensor(name) for name in handle.keys()}
            aliases = json.loads((handle.metadata() or {}).get(ALIASES_KEY, "{}"))
    except (OSError, ValueError, SafetensorError) as err:
        raise ManifestError(f"{path}: unreadable weights ({err})") from None
    for name, tensor in weights.items():
        if tensor.dtype != dtype:
            raise ManifestError(f"{path}: {name} is {tensor.dtype}, the manifest says {dtype}")
    for alias, name in aliases.items():
        if name not in weights:
            raise ManifestError(f"{path}: alias {alias} names {name}, which the file lacks")
        weights[alias] = weights[name]
    return weights


def load_runner(manifest: Manifest, chunk: int, device: torch.device, weights: dict[str, torch.Tensor]):
    """The T = chunk model of the package, its constants pointed at the shared weights."""
    from torch._inductor.package import load_package

    path = manifest.graph_path("package")
    name = f"chunk{chunk}"
    try:
        runner = load_package(str(path), name, device_index=device.index if device.index is not None else -1)
    except RuntimeError as err:
        raise ManifestError(f"{path}: cannot load model {name} ({str(err).strip().splitlines()[0]})") from None
    metadata = runner.get_metadata()
    if metadata.get("chunk") != str(chunk):
        raise ManifestError(f"{path}: model {name} was compiled for T={metadata.get('chunk')}, "
                            f"the manifest says T={chunk}")
    if device.type == "cpu":
        check_cpu_isa(metadata.get("AOTI_CPU_ISA", ""), f"{path}: model {name}")
    needed = runner.get_constant_fqns()
    missing = [fqn for fqn in needed if fqn not in weights]
    if missing:
        raise ManifestError(f"{manifest.graph_path('weights')}: lacks {missing[0]} that model {name} needs")
    runner.load_constants({fqn: weights[fqn] for fqn in needed}, check_full_update=True, user_managed=True)
    return runner.loader


def check_cpu_isa(built: str, where: str) -> None:
    """Refuse a CPU package whose vector ISA (e.g. "AVX512 AVX512_VNNI") this CPU lacks: it would
    die on an illegal instruction, not raise."""
    import platform

    if not built or platform.machine() not in ("x86_64", "AMD64"):
        return
    from torch._inductor.cpu_vec_isa import x86_isa_checker  # cpuid flags; compiles nothing

    here = x86_isa_checker()
    missing = [flag for flag in built.lower().split() if flag not in here]
    if missing:
        raise ManifestError(f"{where} was compiled for {built}; this CPU lacks {', '.join(missing).upper()} "
                            f"(rebuild the artifact on this machine)")
