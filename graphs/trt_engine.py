"""An ONNX artifact -> a TensorRT 10 engine beside its graph: engine.plan, recorded in the manifest.

One engine serves every chunk length and, for a span-axis graph, every span bucket through one
optimization profile each, of exact shapes (artifact/engine_record.py: `profile_plan`), in the
manifest's order: the prefill chunks largest first, then T = 1, each over the span buckets
ascending (every other dim static). One profile min=1/opt=max=P would do too, but TensorRT tunes a
profile's kernels for its `opt` shape, so decode (T = 1, a matrix-vector product and the latency
that matters) would run prefill's matrix-matrix tactics, and no T between 1 and P is ever run; the
same holds for spans, which only ever take the buckets' sizes. Profiles share the weights: each
costs build time and some engine bytes, not weight memory. The runtime keeps one execution
context per chunk length and switches it to the profile of the step's span.

Precision. A float32 artifact builds as "fp32" (strict: TF32 off, so it matches eager to 1e-3) or
as "fp16"/"bf16", which let TensorRT run layers in half precision (the weakly typed builder
flags) while the I/O and the cache stay float32. A float16/bfloat16 artifact already fixes its
types: it is built strongly typed (TensorRT follows the graph's casts, as ONNX Runtime does) and
only its own precision is accepted.

An engine runs only with the TensorRT version and on the GPU model that built it. The manifest
records both (with the precision and profiles under `engines`, the sha256_blocks hash under `files`), and
`check_engine_record` refuses a mismatch before TensorRT is asked to load it: the record's names, that
check and the lazy `tensorrt` import live in mixtral_export.artifact.engine_record, read by build and run.

Atomic: the engine goes to a hidden temp file; the manifest first drops any earlier engine, the
file is renamed into place, then the manifest lists it. At every moment the artifact is valid for
ONNX Runtime, and the TensorRT backend sees either no engine or the complete new one.

`tensorrt` is imported only when a build or a backend needs it, so this module imports anywhere.
"""
from __future__ import annotations

import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from mixtral_export.artifact.contract import StepShapes
from mixtral_export.artifact.engine_record import (
    ENGINE_NAME, gpu_identity, import_tensorrt, profile_plan, recorded_profiles,
)
from mixtral_export.artifact.manifest import MANIFEST_NAME, Manifest, load_manifest, set_engine
from mixtral_export.destinations import refuse, write_file
from mixtral_export.errors import UserError

PRECISIONS = ("fp32", "fp16", "bf16")
FIXED_PRECISION = {"float16": "fp16", "bfloat16": "bf16"}  # artifact dtypes whose types decide the precision


class TrtBuildError(UserError, RuntimeError):
    """An artifact TensorRT cannot turn into an engine; one line naming the file."""


def build_engine(artifact_dir: str | Path, precision: str = "fp32", workspace_gib: float = 4.0,
                 timing_cache: str | Path | None = None, progress: Callable[[str], None] | None = None) -> Path:
    """Build the artifact's step graph into `engine.plan` beside it; returns the engine's path.

    `timing_cache` (a file, created if missing) lets a rebuild on the same GPU and TensorRT reuse
    kernel timings: minutes instead of tens of minutes for a large model.
    """
    folder = Path(artifact_dir)
    say = progress or (lambda stage: None)
    if precision not in PRECISIONS:
        raise TrtBuildError(f"{folder}: precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if not workspace_gib > 0:
        raise TrtBuildError(f"{folder}: the workspace must be a positive number of GiB, got {workspace_gib}")
    say("checking the artifact's files")
    manifest = load_manifest(folder)  # re-hashes: never build an engine from a modified graph
    if (folder / ENGINE_NAME).exists() and ENGINE_NAME not in manifest.engines:
        raise refuse(folder / ENGINE_NAME, f"exists and is not an engine listed in {MANIFEST_NAME}")
    if manifest.kind != "onnx":
        raise TrtBuildError(f"{folder / MANIFEST_NAME}: a {manifest.kind!r} artifact; TensorRT builds from ONNX ones")
    if manifest.routing != "dense":
        raise TrtBuildError(f"{folder / MANIFEST_NAME}: {manifest.routing!r} routing uses ONNX Runtime's "
                            f"com.microsoft.MoE, which TensorRT cannot parse; export with --routing dense")
    strongly_typed = fixed_by_graph(manifest, precision)
    trt = import_tensorrt()
    gpu, capability = gpu_identity()
    graph = manifest.graph_path("step")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)  # explicit batch is TensorRT 10's only mode
    say(f"parsing {graph.name} with TensorRT {trt.__version__}'s ONNX parser")
    parser = parse(trt, network, logger, graph)  # owns the weights: must outlive the build
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if not strongly_typed:  # strongly typed networks take their precision from the graph, not flags
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 layers stay fp32: parity with eager
        if precision != "fp32":
            config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
    profiles = add_profiles(builder, network, config, manifest.shapes, manifest.chunks, graph)
    cache_file = None if timing_cache is None else Path(timing_cache)
    if cache_file is not None:
        attach_timing_cache(config, cache_file)
    say(f"building the {precision} engine for {gpu} (compute capability {capability}); this takes minutes")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TrtBuildError(f"{graph}: TensorRT could not build an engine (its log above says why)")
    del parser
    if cache_file is not None:
        write_file(cache_file, bytes(config.get_timing_cache().serialize()), is_ours=lambda old: True)  # named by the user as in and out
    say(f"writing {ENGINE_NAME} ({plan.nbytes / (1 << 30):.2f} GiB) and the manifest")
    record = {"tensorrt": trt.__version__, "gpu": gpu, "compute_capability": capability, "precision": precision,
              "profiles": profiles, "strongly_typed": strongly_typed, "workspace_gib": workspace_gib,
              "built": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    install(folder, plan, record)
    say(f"wrote {folder / ENGINE_NAME}")
    return folder / ENGINE_NAME


def fixed_by_graph(manifest: Manifest, precision: str) -> bool:
    """True when the graph's own types fix the precision (a float16/bfloat16 artifact); refuses a graph
    whose KV cache has a type of its own (--kv-dtype: the TensorRT runtime keeps the build's)."""
    if manifest.shapes.kv_dtype is not None:
        raise TrtBuildError(f"{manifest.graph_path('step')}: its KV cache is {manifest.shapes.kv_dtype} (--kv-dtype); "
                            f"TensorRT engines keep a {manifest.dtype} cache: export without --kv-dtype")
    fixed = FIXED_PRECISION.get(manifest.dtype)
    if fixed is not None and precision != fixed:
        raise TrtBuildError(f"{manifest.graph_path('step')}: a {manifest.dtype} graph builds only as {fixed} "
                            f"(its types fix the precision); export float32 for a {precision} engine")
    return fixed is not None


def parse(trt, network, logger, graph: Path):
    """Parse by path, so TensorRT finds the external weights beside the graph; the parser, or its errors."""
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        # str() of a parser error names the node, the operator's importer and the reason
        detail = "; ".join(" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors))
        raise TrtBuildError(f"{graph}: TensorRT's ONNX parser refused it: {detail or 'no error given'}")
    return parser


def add_profiles(builder, network, config, shapes: StepShapes, chunks: tuple[int, ...],
                 graph: Path) -> dict[str, dict[str, int]]:
    """One exact optimization profile per (chunk length, span bucket), in `profile_plan`'s order;
    returns the record {"T": {"span": profile index}}."""
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    # the contract with -1 where T (and a span-axis graph's S) is free, as TensorRT reports it
    symbolic = shapes.input_shapes(-1, span=-1 if shapes.span_axis else None)
    for tensor in inputs:
        if tensor.name not in symbolic or tuple(tensor.shape) != symbolic[tensor.name]:
            raise TrtBuildError(f"{graph}: input {tensor.name} {tuple(tensor.shape)} is not the contract's "
                                f"{symbolic.get(tensor.name)} (inputs must be {', '.join(shapes.input_names)})")
    plan = profile_plan(shapes, chunks)
    for n, (chunk, span, exact) in enumerate(plan):
        profile = builder.create_optimization_profile()
        for tensor in inputs:
            if -1 in tuple(tensor.shape):
                shape = exact[tensor.name]
                profile.set_shape(tensor.name, shape, shape, shape)  # min = opt = max
        if config.add_optimization_profile(profile) != n:  # -1: refused; the record assumes plan order
            raise TrtBuildError(f"{graph}: TensorRT refused the optimization profile for T={chunk} over {span} slots")
    return recorded_profiles(plan)


def attach_timing_cache(config, path: Path) -> None:
    cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise TrtBuildError(f"{path}: a timing cache from another GPU or TensorRT version; delete it or pass "
                            f"another --timing-cache")


def install(folder: Path, plan, record: dict) -> None:
    """Write the engine beside the graph and list it in the manifest, never leaving a half state."""
    handle, tmp = tempfile.mkstemp(prefix=f".{ENGINE_NAME}.", suffix=".partial", dir=folder)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(plan)
        os.chmod(tmp, 0o644)
        set_engine(folder, ENGINE_NAME, None)  # the old engine is no longer listed...
        os.replace(tmp, folder / ENGINE_NAME)  # ...when the new one takes its place...
        set_engine(folder, ENGINE_NAME, record)  # ...and is hashed and listed
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
