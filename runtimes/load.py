"""Open an artifact on a named runtime. ORT never imports torch; eager loads the source checkpoint.

A step artifact opens as a step backend (runtimes/step.py), a head artifact as a head backend
(runtimes/heads.py): `open_backend` dispatches once on the manifest's class, `open_step_backend` and
`open_head_backend` take one kind and refuse the other with one line naming the class that runs it.
"""
from __future__ import annotations

from pathlib import Path

from mixtral_export.artifact.manifest import HeadManifest, Manifest, check_compatible, load_manifest
from mixtral_export.errors import UserError

RUNTIMES = ("eager", "compiled", "ort", "aoti", "trt")
HEAD_RUNTIMES = ("eager", "ort")
ARTIFACT_KIND = {"ort": "onnx", "aoti": "aoti", "trt": "onnx"}  # eager and compiled run any artifact's source checkpoint


class RuntimeLoadError(UserError, ValueError):
    """A runtime that cannot serve this artifact here; one line saying why."""


class ArtifactKindError(RuntimeLoadError):
    """A head artifact opened to generate, or a step artifact opened to score."""


def load_step_manifest(artifact: str | Path, verify_files: bool = False) -> Manifest:
    """The manifest of a step artifact (generation); a head artifact, or one stage of a staged
    artifact on its own, is refused."""
    manifest = load_manifest(artifact, verify_files=verify_files)
    if isinstance(manifest, HeadManifest):
        raise ArtifactKindError(f"{manifest.folder}: a {manifest.head} artifact does not generate; score it "
                                f"(HeadSession, mixtral-export score)")
    if manifest.stage is not None:
        raise ArtifactKindError(f"{manifest.folder}: stage {manifest.stage.index} of a staged artifact; run the "
                                f"artifact's top folder (its parent), which chains every stage")
    return manifest


def load_head_manifest(artifact: str | Path, verify_files: bool = False) -> HeadManifest:
    """The manifest of a head artifact (scoring); a causal-LM step artifact is refused."""
    manifest = load_manifest(artifact, verify_files=verify_files)
    if not isinstance(manifest, HeadManifest):
        raise ArtifactKindError(f"{manifest.folder}: a causal-LM artifact has no head to score; generate with it "
                                f"(Session, mixtral-export generate)")
    return manifest


def open_backend(artifact: str | Path, runtime: str, provider: str = "cpu", threads: int | None = None,
                 checkpoint: str | Path | None = None):
    """(backend, manifest) for `runtime` over the artifact folder: a step backend over a step
    artifact, a head backend over a head artifact."""
    check_runtime(runtime)
    manifest = load_manifest(artifact, verify_files=False)  # the backend verifies hashes once
    if isinstance(manifest, HeadManifest):
        return _head_backend(manifest, runtime, provider, threads, checkpoint), manifest
    return _step_backend(manifest, runtime, provider, threads, checkpoint), manifest


def open_step_backend(artifact: str | Path, runtime: str, provider: str = "cpu", threads: int | None = None,
                      checkpoint: str | Path | None = None, ray: bool = False, stage_options=None,
                      row_groups: int = 1):
    """(step backend, Manifest) for `runtime` over a step artifact; a staged artifact's stages run in
    this process, or with `ray` one Ray actor each (runtimes/pipeline.py; `stage_options`: their Ray
    options; `row_groups`: groups of the artifact's batch rows in flight through the stages together)."""
    check_runtime(runtime)
    manifest = load_step_manifest(artifact)
    if ray and not (manifest.stages and runtime == "ort"):
        raise RuntimeLoadError(f"{manifest.folder}: --ray runs the stages of a staged artifact on ort "
                               f"(export with --stages N)")
    if row_groups != 1 and not (manifest.stages and runtime == "ort"):
        raise RuntimeLoadError(f"{manifest.folder}: --row-groups keeps groups of rows in flight through the "
                               f"stages of a staged artifact on ort (export with --stages N)")
    return _step_backend(manifest, runtime, provider, threads, checkpoint, ray, stage_options, row_groups), manifest


def open_head_backend(artifact: str | Path, runtime: str, provider: str = "cpu", threads: int | None = None,
                      checkpoint: str | Path | None = None):
    """(head backend, HeadManifest) for `runtime` over a head artifact."""
    check_runtime(runtime)
    manifest = load_head_manifest(artifact)
    return _head_backend(manifest, runtime, provider, threads, checkpoint), manifest


def check_runtime(runtime: str) -> None:
    """Refuse an unknown runtime name before anything is read."""
    if runtime not in RUNTIMES:
        raise RuntimeLoadError(f"unknown runtime {runtime!r} (one of {', '.join(RUNTIMES)})")


def open_tokenizer(manifest: Manifest | HeadManifest):
    """The artifact's tokenizer (mixtral_export/tokenizer.py), or None when its checkpoint had none."""
    if not manifest.tokenizer:
        return None
    from mixtral_export.tokenizer import Tokenizer

    return Tokenizer.from_file(manifest.path(manifest.tokenizer))


def _step_backend(manifest: Manifest, runtime: str, provider: str, threads: int | None,
                  checkpoint: str | Path | None, ray: bool = False, stage_options=None, row_groups: int = 1):
    artifact = manifest.folder
    if manifest.stages and runtime not in ("ort", "eager"):
        raise RuntimeLoadError(f"{manifest.folder}: a staged artifact runs on ort (its stages chained) or eager "
                               f"(the whole model on its source checkpoint), not {runtime}")
    if manifest.stages and runtime == "ort":
        from mixtral_export.runtimes.pipeline import open_pipeline

        return open_pipeline(manifest, provider=provider, threads=threads, ray=ray, stage_options=stage_options,
                             row_groups=row_groups)
    kind = ARTIFACT_KIND.get(runtime)
    if kind is not None and manifest.kind != kind:
        raise RuntimeLoadError(f"{manifest.folder}: the {runtime} runtime needs an {kind} artifact, this one is "
                               f"{manifest.kind} (export it with --format {kind})")
    if runtime == "ort":
        from mixtral_export.runtimes.ort import OrtBackend

        return OrtBackend(artifact, provider=provider, threads=threads)
    if manifest.shapes.kv_dtype is not None:
        raise RuntimeLoadError(f"{manifest.folder}: the {runtime} runtime keeps a {manifest.shapes.dtype} KV cache, this "
                               f"artifact's is {manifest.shapes.kv_dtype} (--kv-dtype); run it on ort")
    if runtime == "trt":
        from mixtral_export.runtimes.trt import TrtBackend

        return TrtBackend(artifact)
    if runtime == "aoti":
        from mixtral_export.runtimes.aoti import AotiBackend

        return AotiBackend(artifact, device=_torch_device(provider))
    backend = eager_backend(manifest, checkpoint, device=_torch_device(provider))
    if runtime == "compiled":
        from mixtral_export.runtimes.compiled import CompiledBackend

        backend = CompiledBackend(backend.model, manifest.shapes, device=backend.device)
        backend.warmup()  # compile both chunk lengths now, timed apart from generation
    return backend


def _torch_device(provider: str) -> str:
    if provider not in ("cpu", "cuda"):
        raise RuntimeLoadError(f"--provider {provider!r} is for ORT; torch runtimes take cpu or cuda")
    return provider


def eager_backend(manifest: Manifest, checkpoint: str | Path | None = None, device: str = "cpu",
                  float_weights: bool = False):
    """The PyTorch model on the checkpoint the artifact was built from, with the artifact's shapes.

    On a quantized artifact it runs on the artifact's dequantized weights (so comparing it with
    ORT checks the kernels, not the quantization), unless float_weights asks for the originals.
    """
    from mixtral_export.checkpoint import load_model
    from mixtral_export.runtimes.eager import EagerBackend

    source = eager_source(manifest, checkpoint)
    model = load_model(source, dtype=manifest.shapes.dtype, attention_window=manifest.shapes.attention_window,
                       routing=manifest.routing)
    if manifest.quantization and not float_weights:
        dequantize_model(model, manifest.quantization)
    return EagerBackend(model, manifest.shapes, device=device)


def _head_backend(manifest: HeadManifest, runtime: str, provider: str, threads: int | None,
                  checkpoint: str | Path | None):
    """A HeadBackend (runtimes/heads.py) over a head artifact: ort, or eager on its source checkpoint."""
    if runtime not in HEAD_RUNTIMES:
        raise RuntimeLoadError(f"{manifest.folder}: a {manifest.head} head graph runs on eager or ort, not {runtime}")
    if runtime == "ort":
        from mixtral_export.runtimes.ort_heads import OrtHeadBackend

        return OrtHeadBackend(manifest.folder, provider=provider, threads=threads)
    from mixtral_export.checkpoint import load_head_model
    from mixtral_export.artifact.config import MixtralConfig
    from mixtral_export.runtimes.eager_heads import EagerHeadBackend

    source = _source(manifest, checkpoint)
    check_compatible(manifest, MixtralConfig.from_json(source))
    model = load_head_model(source, head=manifest.head, dtype=manifest.dtype, routing=manifest.routing)
    return EagerHeadBackend(model, manifest.shapes, device=_torch_device(provider))


def _source(manifest: Manifest | HeadManifest, checkpoint: str | Path | None) -> Path:
    source = Path(checkpoint) if checkpoint else (Path(manifest.source) if manifest.source else None)
    if source is None or not (source / "config.json").exists():
        raise RuntimeLoadError(f"{manifest.folder}: the eager runtime needs the source checkpoint "
                               f"({source or 'not recorded'} is not there); pass its folder")
    return source


def eager_source(manifest: Manifest, checkpoint: str | Path | None = None) -> Path:
    """The source checkpoint folder of a step artifact (--checkpoint, else the one recorded at export),
    checked to hold the model the artifact was built from."""
    from mixtral_export.artifact.config import MixtralConfig

    source = _source(manifest, checkpoint)
    check_compatible(manifest, MixtralConfig.from_json(source))
    return source


def dequantize_model(model, record: dict, round_activations: bool = True) -> None:
    """Replace every weight the manifest's quantization record lists by its dequantized self, quantized
    exactly as the export did (the artifact's weight codes), and round the inputs of those GEMMs to
    int8 per block as ORT's kernels do (record["activations"])."""
    import torch

    from mixtral_export.artifact.contract import WEIGHT_SCHEMES
    from mixtral_export.artifact.weight_codes import round_trip
    from mixtral_export.model import int8_blocks

    scheme, block = WEIGHT_SCHEMES[record["scheme"]], int(record["block_size"])
    for name in record["tensors"]:
        owner, attr = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
        weight = getattr(owner, attr).detach()
        values = round_trip(weight.float().numpy(), scheme, block)  # (..., N, K)
        setattr(owner, attr, torch.nn.Parameter(torch.from_numpy(values).to(weight.dtype), requires_grad=False))
        if not round_activations or record.get("activations") != "int8":
            continue
        if attr == "w13":
            owner.activation_block = block
        elif isinstance(owner, torch.nn.Linear):
            owner.register_forward_pre_hook(lambda module, args: (int8_blocks(args[0], block),))
