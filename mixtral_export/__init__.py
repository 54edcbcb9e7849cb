"""mixtral-export: a Mixtral checkpoint to static-shape inference graphs, proved against the reference.

The public Python API is the names below; everything else under `mixtral_export` is internal and
may change between versions (docs/design.md maps it).

    from mixtral_export import Session, export_onnx
    export_onnx("path/to/checkpoint", "out/model-onnx", batch=2, prefill_chunk=16)
    with Session.open("out/model-onnx") as session:
        print(session.generate("Once upon a time", max_new_tokens=20))

Each name is imported when first used, so `import mixtral_export` is cheap and the ONNX Runtime
path never imports torch.
"""
from __future__ import annotations

from importlib import import_module

# name -> the module that defines it
_PUBLIC = {
    "Session": "mixtral_export.runtimes.session",
    "HeadSession": "mixtral_export.runtimes.head_session",
    "GenerationConfig": "mixtral_export.runtimes.requests",
    "SamplingParams": "mixtral_export.runtimes.sampling",
    "export_onnx": "mixtral_export.graphs.onnx_export",
    "export_head_onnx": "mixtral_export.graphs.onnx_heads",
    "export_aoti": "mixtral_export.graphs.aoti_export",
    "verify_artifact": "mixtral_export.runtimes.verify",
    "load_manifest": "mixtral_export.artifact.manifest",
    "Manifest": "mixtral_export.artifact.manifest",
    "MixtralConfig": "mixtral_export.artifact.config",
    "UserError": "mixtral_export.errors",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'mixtral_export' has no attribute {name!r}")
    return getattr(import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return __all__
