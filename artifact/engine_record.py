"""A TensorRT engine's record in the manifest, and this machine's TensorRT and GPU it is checked against.

An engine runs only with the TensorRT version and on the GPU model that built it, so the build
(graphs/trt_engine.py) records both and the backend (runtimes/trt.py) refuses a mismatch before
TensorRT is asked to load the file. Both sides read the same names and the same check from here.

`tensorrt` and torch (which names the GPU) are imported only when a function here is called, so the
artifact package stays importable on the ORT path without either.
"""
from __future__ import annotations

from pathlib import Path

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
