"""A checkpoint folder -> an AOTInductor artifact: model.pt2 + weights.safetensors + manifest.json.

`torch.export` traces the step once per chunk length (each prefill chunk and T = 1, each fully
static, so Inductor specialises every kernel), AOTInductor compiles each to a shared library, and
all go into ONE package as named models, "chunk<T>" (`torch._inductor.aot_compile` with
`aot_inductor.package=True`, then `torch._inductor.package.package_aoti`: the multi-model route
`aoti_compile_and_package`'s own docstring gives; that function itself packages one model).

Weights once: both libraries are built with `aot_inductor.package_constants_in_so=False`, so the
package holds code only, and the weights go once into weights.safetensors under the names the
compiled models ask for (`get_constant_fqns`). The runtime loads that file once and hands the
same tensors to both models (`load_constants(user_managed=True)`, no copy). Embedding both would
store, and load, every weight twice. Tied parameters are saved once; the file's metadata maps
each alias (e.g. lm_head.weight) to the stored name.

Spans (artifact/contract.py): each model's cache slot axis is symbolic (`torch.export.Dim.DYNAMIC`
from the smallest span bucket to S, as the ONNX graph's SPAN_AXIS), so the runtime passes the span
of the ring in use and one library per chunk length serves every span; a ring with one bucket
(S <= MIN_SPAN) is exported static. The manifest says `span_axis`.

A package is tied to where it was built: the device (cpu or cuda; CUDA kernels for this GPU
arch), the CPU ISA Inductor targeted (AVX512 vs AVX2) and the libtorch ABI, so the manifest
records the device and torch version and the runtime refuses others. The build is atomic like
the ONNX one: a hidden temp folder, the manifest last, then a rename.
"""
from __future__ import annotations

import gc
import json
import warnings
from pathlib import Path
from typing import Callable

from mixtral_export.artifact.contract import FLOAT_DTYPES, NO_POSITION, StepShapes
from mixtral_export.graphs.artifact_folder import ExportError, building, finish
from mixtral_export.artifact.config import MixtralConfig

PACKAGE_NAME = "model.pt2"
WEIGHTS_NAME = "weights.safetensors"
ALIASES_KEY = "aliases"  # safetensors metadata: JSON {alias: stored name} for tied parameters
DEVICES = ("cpu", "cuda")


def model_name(chunk: int) -> str:
    """The name of the T = chunk model inside the package."""
    return f"chunk{chunk}"


def export_aoti(checkpoint_folder: str | Path, out_dir: str | Path, dtype: str | None = "float32", batch: int = 1,
                prefill_chunk: int | tuple[int, ...] = 16, cache_slots: int | None = None, slide: bool = False,
                device: str = "cpu", progress: Callable[[str], None] | None = None, routing: str = "dense") -> Path:
    """Compile the checkpoint's step for these static shapes on `device` into `out_dir`; returns out_dir.

    routing "dense" | "gather" picks how the MoE blocks compute (mixtral_export/model.py);
    dtype None means the checkpoint's own.
    """
    checkpoint, out = Path(checkpoint_folder), Path(out_dir)
    say = progress or (lambda stage: None)
    dtype = dtype or MixtralConfig.from_json(checkpoint / "config.json").dtype
    if dtype not in FLOAT_DTYPES:
        raise ExportError(f"{out}: dtype {dtype!r} is not supported (one of {', '.join(FLOAT_DTYPES)})")
    if device not in DEVICES:
        raise ExportError(f"{out}: device {device!r} is not supported (one of {', '.join(DEVICES)})")
    import torch

    from mixtral_export.model import ROUTINGS

    if routing not in ROUTINGS:
        raise ExportError(f"{out}: routing {routing!r} is not supported (one of {', '.join(ROUTINGS)})")
    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError(f"{out}: device 'cuda' asked for, but this torch sees no CUDA GPU")
    config = MixtralConfig.from_json(checkpoint / "config.json").replace(dtype=dtype)
    shapes = StepShapes.for_config(config, batch=batch, prefill_chunk=prefill_chunk, cache_slots=cache_slots,
                                   dtype=dtype, slide=slide, span_axis=True)
    with building(out) as tmp:
        say(f"loading {checkpoint} as {dtype}")
        from mixtral_export.checkpoint import load_model

        model = load_model(checkpoint, dtype=dtype, attention_window=shapes.attention_window,
                           routing=routing).to(device)
        files = {}
        for chunk in shapes.chunks:
            say(f"compiling T={chunk} with AOTInductor (B={shapes.batch}, S={shapes.cache_slots}, {device}, "
                f"{routing} MoE)")
            files[model_name(chunk)] = compile_chunk(model, shapes, chunk, device)
        from torch._inductor.package import package_aoti

        package_aoti(str(tmp / PACKAGE_NAME), files)
        say(f"writing {WEIGHTS_NAME}")
        save_weights(model, tmp / PACKAGE_NAME, shapes.chunks, tmp / WEIGHTS_NAME)
        del model
        gc.collect()
        say("hashing files and writing the manifest")
        finish(tmp, checkpoint, config, kind="aoti", shapes=shapes,
               graphs={"package": PACKAGE_NAME, "weights": WEIGHTS_NAME}, device=device, routing=routing)
    say(f"wrote {out}")
    return out


def example_inputs(shapes: StepShapes, chunk: int, device: str) -> tuple:
    """The step's inputs at chunk length `chunk`, over all S slots."""
    import torch

    from mixtral_export.model import TORCH_DTYPES

    dtype = TORCH_DTYPES[shapes.dtype]
    return (torch.zeros(shapes.batch, chunk, dtype=torch.int64, device=device),  # input_ids (B, T)
            torch.arange(chunk, dtype=torch.int64, device=device).repeat(shapes.batch, 1),  # positions (B, T)
            list(torch.zeros(shapes.cache_shape(), dtype=dtype, device=device)),  # cache_k: L x (B, Hkv, S, D)
            list(torch.zeros(shapes.cache_shape(), dtype=dtype, device=device)),  # cache_v: L x (B, Hkv, S, D)
            torch.full((shapes.batch, shapes.cache_slots), NO_POSITION, dtype=torch.int64, device=device))


def span_shapes(shapes: StepShapes) -> tuple | None:
    """torch.export's dynamic_shapes for the step's arguments: the cache slot axis dynamic from the smallest
    span bucket to S (None, all static, for a ring of one bucket or a graph without the span axis)."""
    import torch

    buckets = shapes.span_buckets
    if len(buckets) < 2:
        return None
    # DYNAMIC, not a named Dim: the trace guards min(T + S, ...) == T + S, true for every S >= 0 but
    # beyond what a named Dim's range check proves, so it refuses; DYNAMIC still fails if S specialises
    span = torch.export.Dim.DYNAMIC(min=buckets[0], max=buckets[-1])
    layers = [{2: span}] * shapes.num_layers  # each layer's (B, Hkv, S, D)
    return None, None, layers, layers, {1: span}  # ids, positions, cache_k, cache_v, cache_positions (B, S)


def compile_chunk(model, shapes: StepShapes, chunk: int, device: str) -> list:
    """torch.export the T = chunk step (its span symbolic) and AOT-compile it without its weights;
    returns AOTI's files."""
    import torch

    args = example_inputs(shapes, chunk, device)
    options = {"aot_inductor.package": True, "aot_inductor.package_constants_in_so": False,
               "aot_inductor.metadata": {"chunk": str(chunk)}}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # pytree deprecation chatter from inside torch
            program = torch.export.export(model, args, dynamic_shapes=span_shapes(shapes), strict=False)
            return torch._inductor.aot_compile(program.module(), args, options=options)
    except Exception as err:  # torch's messages run to pages; the cause stays chained
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ExportError(f"AOTInductor could not compile the T={chunk} step ({type(err).__name__}: "
                          f"{first[:300]})") from err


def save_weights(model, package: Path, chunks: tuple[int, ...], path: Path) -> None:
    """Every constant the packaged models need, each stored once, tied names as metadata aliases."""
    import torch
    from safetensors.torch import save_file
    from torch._inductor.package import load_package

    needed = set()
    for chunk in chunks:
        needed.update(load_package(str(package), model_name(chunk)).get_constant_fqns())
    named = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    missing = sorted(needed - set(named))
    if missing:
        raise ExportError(f"{package}: the compiled models need constants the model lacks: {', '.join(missing[:3])}")
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    stored: dict[int, str] = {}  # id of a parameter -> its stored name
    for name in sorted(needed):
        tensor = named[name]
        if id(tensor) in stored:
            aliases[name] = stored[id(tensor)]
            continue
        stored[id(tensor)] = name
        tensors[name] = tensor.detach().contiguous()
    save_file(tensors, str(path), metadata={ALIASES_KEY: json.dumps(aliases, sort_keys=True)})
