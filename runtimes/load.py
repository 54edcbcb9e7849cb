"""Open an artifact on a named runtime. ORT never imports torch; eager loads the source checkpoint."""
from __future__ import annotations

from pathlib import Path

from graphs.manifest import Manifest, check_compatible, load_manifest

RUNTIMES = ("eager", "ort")


class RuntimeLoadError(ValueError):
    """A runtime that cannot serve this artifact here; one line saying why."""


def open_backend(artifact: str | Path, runtime: str, provider: str = "cpu", threads: int | None = None,
                 checkpoint: str | Path | None = None):
    """(backend, manifest) for `runtime` over the artifact folder."""
    manifest = load_manifest(artifact, verify_files=False)  # the backend verifies hashes once
    if runtime == "ort":
        from runtimes.ort import OrtBackend

        return OrtBackend(artifact, provider=provider, threads=threads), manifest
    if runtime == "eager":
        return eager_backend(manifest, checkpoint), manifest
    raise RuntimeLoadError(f"unknown runtime {runtime!r} (one of {', '.join(RUNTIMES)})")


def eager_backend(manifest: Manifest, checkpoint: str | Path | None = None):
    """The PyTorch model on the checkpoint the artifact was built from, with the artifact's shapes."""
    from mixtral_export.checkpoint import load_model
    from mixtral_export.config import MixtralConfig
    from runtimes.eager import EagerBackend

    source = Path(checkpoint) if checkpoint else (Path(manifest.source) if manifest.source else None)
    if source is None or not (source / "config.json").exists():
        raise RuntimeLoadError(f"{manifest.folder}: the eager runtime needs the source checkpoint "
                               f"({source or 'not recorded'} is not there); pass its folder")
    check_compatible(manifest, MixtralConfig.from_json(source))
    model = load_model(source, dtype=manifest.shapes.dtype, attention_window=manifest.shapes.attention_window)
    return EagerBackend(model, manifest.shapes)
