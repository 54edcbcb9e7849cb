"""The ONNX Runtime head backend: one session over a head artifact's static (B, T) graph. No torch.

A head graph has no cache and one shape, so a plain `session.run` serves it; the session options,
the providers and the weight preloading are the step backend's (runtimes/ort.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from mixtral_export.artifact.contract import DTYPES, HEAD_INPUT_NAMES, HeadShapes
from mixtral_export.artifact.manifest import MANIFEST_NAME, HeadManifest, ManifestError, load_manifest
from mixtral_export.runtimes.heads import check_head_inputs
from mixtral_export.runtimes.ort import OrtBackendError, check_provider, session_options
from mixtral_export.runtimes.resident_weights import make_resident


class OrtHeadBackend:
    """HeadBackend over an ONNX head artifact folder (see graphs/onnx_heads.py)."""

    name = "ort"

    def __init__(self, artifact_dir: str | Path, provider: str = "cpu", threads: int | None = None,
                 verify_files: bool = True, preload: bool = True):
        self.manifest: HeadManifest = load_manifest(artifact_dir, verify_files=verify_files)
        path = self.manifest.folder / MANIFEST_NAME
        if not isinstance(self.manifest, HeadManifest):
            raise OrtBackendError(f"{path}: a causal-LM step artifact, not a head graph (use the step backend)")
        provider_name = check_provider(self.manifest, provider)
        self.shapes: HeadShapes = self.manifest.shapes
        self.session = ort.InferenceSession(str(self.manifest.graph_path("head")), session_options(threads, False),
                                            providers=[provider_name])
        check_head_session_io(self.session, self.manifest)
        data_files = [self.manifest.path(name) for name in self.manifest.files if name.endswith(".data")]
        self.resident_bytes = make_resident(data_files) if preload else 0

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)  # (B, T)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)  # (B, T)
        check_head_inputs(self.shapes, self.manifest.config.vocab_size, ids, mask)
        values = self.session.run(list(self.shapes.output_names), dict(zip(HEAD_INPUT_NAMES, (ids, mask))))
        return dict(zip(self.shapes.output_names, values))


def check_head_session_io(session: ort.InferenceSession, manifest: HeadManifest) -> None:
    """The loaded graph has the manifest's head I/O: names in order, element types, static dims."""
    path = manifest.graph_path("head")
    for side, values in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        want = manifest.io[side]
        if [v.name for v in values] != [e["name"] for e in want]:
            raise ManifestError(f"{path}: graph {side} are {[v.name for v in values]}, the manifest says "
                                f"{[e['name'] for e in want]}")
        for value, entry in zip(values, want):
            if value.type != DTYPES[entry["dtype"]].ort or list(value.shape) != entry["shape"]:
                raise ManifestError(f"{path}: {value.name} is {value.type} {value.shape}, the manifest says "
                                    f"{entry['dtype']} {entry['shape']}")
