"""A TensorRT engine's record in the manifest, and this machine's TensorRT and GPU it is checked against.

An engine runs only with the TensorRT version and on the GPU model that built it, so the build
(graphs/trt_engine.py) records both and the backend (runtimes/trt.py) refuses a mismatch before
TensorRT is asked to load the file. Both sides read the same names and the same check from here.

Profiles: an engine has one optimization profile per (chunk length T, span bucket), each of exact
shapes (min = opt = max), recorded as {"T": {"span": index}}; `profile_plan` says what the build
adds, `profile_for` which profile a step of T over a span runs. Exact profiles, not one per T whose
min/opt/max cover the buckets: TensorRT tunes a profile's kernels for its `opt` shape alone, while
a step only ever runs a bucket's shape, so every bucket gets kernels tuned for it; the layers whose
shapes do not depend on the span (every projection and expert) time once per build and reuse the
timing. Engines recorded before spans ({"T": index}) have one whole-ring profile per T.

`tensorrt` and torch (which names the GPU) are imported only when a function here is called, so the
artifact package stays importable on the ORT path without either.
"""
from __future__ import annotations

from pathlib import Path

from mixtral_export.artifact.contract import StepShapes
from mixtral_export.artifact.manifest import ManifestError
from mixtral_export.errors import UserError

ENGINE_NAME = "engine.plan"
TRT_MAJOR = "10"
INSTALL_HINT = "TensorRT is not installed (pip install mixtral-export[tensorrt] on a machine with NVIDIA's TensorRT 10)"


class TrtUnavailable(UserError, RuntimeError):
    """No usable TensorRT or no CUDA GPU here; one line saying what to install or where to run."""


class EngineMismatch(ManifestError):
    """An engine built by another TensorRT version or for another GPU; one line naming the file."""


def import_tensorrt():
    """The `tensorrt` module, checked to be TensorRT 10."""
    try:
        import tensorrt
    except ImportError:
        raise TrtUnavailable(INSTALL_HINT) from None
    if tensorrt.__version__.split(".")[0] != TRT_MAJOR:
        raise TrtUnavailable(f"TensorRT {tensorrt.__version__} is installed; this project builds and runs "
                             f"TensorRT {TRT_MAJOR} engines")
    return tensorrt


def gpu_identity() -> tuple[str, str]:
    """(name, compute capability "major.minor") of the current CUDA device, through torch."""
    import torch

    if not torch.cuda.is_available():
        raise TrtUnavailable("no CUDA GPU is visible (torch.cuda.is_available() is False); TensorRT engines "
                             "are built and run on the GPU they are for")
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def check_engine_record(record: dict, trt_version: str, gpu_name: str, compute_capability: str,
                        where: str | Path = ENGINE_NAME) -> None:
    """Refuse an engine whose recorded TensorRT version or GPU differs from this machine's."""
    differences = []
    if record["tensorrt"] != trt_version:
        differences.append(f"TensorRT {record['tensorrt']} (here: {trt_version})")
    if record["gpu"] != gpu_name or record["compute_capability"] != compute_capability:
        differences.append(f"a {record['gpu']} with compute capability {record['compute_capability']} "
                           f"(here: {gpu_name}, {compute_capability})")
    if differences:
        raise EngineMismatch(f"{where}: built with {' for '.join(differences)}; an engine runs only with the "
                             f"TensorRT and on the GPU that built it: rebuild it here with "
                             f"`mixtral-export build-engine`")


def profile_plan(shapes: StepShapes, chunks: tuple[int, ...]) -> list[tuple[int, int, dict[str, tuple[int, ...]]]]:
    """Every profile an engine is built with, in index order: (T, span, {input: its exact shape}) per chunk
    length in the manifest's order, per span bucket ascending (just S for a graph without the span axis)."""
    return [(chunk, span, shapes.input_shapes(chunk, span)) for chunk in chunks for span in shapes.span_buckets]


def recorded_profiles(plan: list[tuple[int, int, dict]]) -> dict[str, dict[str, int]]:
    """The manifest's record of a plan's profiles: {"T": {"span": profile index}}."""
    profiles: dict[str, dict[str, int]] = {}
    for index, (chunk, span, _) in enumerate(plan):
        profiles.setdefault(str(chunk), {})[str(span)] = index
    return profiles


def engine_spans(profiles: dict, chunk: int, slots: int) -> tuple[int, ...]:
    """The spans an engine's profiles take for T = chunk, ascending; (S,) for a record from before spans."""
    entry = profiles[str(chunk)]
    return (slots,) if isinstance(entry, int) else tuple(sorted(int(span) for span in entry))


def profile_for(profiles: dict, chunk: int, span: int, slots: int) -> int:
    """The profile index a step of T = chunk over `span` slots runs on."""
    entry = profiles[str(chunk)]
    if isinstance(entry, int):  # recorded before spans: one profile per T, over the whole ring
        if span != slots:
            raise ValueError(f"this engine takes the whole ring ({slots} slots) only, not a span of {span}")
        return entry
    if str(span) not in entry:
        raise ValueError(f"this engine has no profile for T={chunk} over {span} slots "
                         f"(spans {', '.join(sorted(entry, key=int))})")
    return entry[str(span)]


def profile_count(profiles: dict) -> int:
    """How many optimization profiles a record lists."""
    return sum(1 if isinstance(entry, int) else len(entry) for entry in profiles.values())
