"""The one family of errors a user can cause, through the CLI or the Python API.

Every such error derives from `UserError`: its message is the whole story, one line naming the
problem and the file, so the CLI prints it without a traceback (exit 2). The module imports
nothing, so catching the family never drags torch into a command that does not need it.
"""
from __future__ import annotations

# Optional packages -> the extra that installs them (pyproject.toml's optional-dependencies).
EXTRAS = {"torch": "export", "onnx": "export", "onnxscript": "export", "onnx_ir": "export",
          "transformers": "reference", "jinja2": "reference", "matplotlib": "plot", "tensorrt": "tensorrt",
          "fastapi": "serve", "starlette": "serve", "uvicorn": "serve", "prometheus_client": "serve",
          "ray": "ray", "mistral_common": "reference", "ml_dtypes": "export", "jsonschema": "serve"}


class UserError(Exception):
    """Bad input, options or files: one line, no traceback."""


class UsageError(UserError, ValueError):
    """A flag or argument combination that makes no sense."""


# Extras that pull torch: from PyPI that is the multi-GB CUDA build, even on a machine without a GPU.
TORCH_EXTRAS = ("export",)
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def missing_extra(error: ModuleNotFoundError, needed_by: str = "this") -> str | None:
    """One line for an optional package that is not installed, or None when it is not one of ours.
    An extra with torch points at scripts/install.sh (it picks the machine's torch build) or the CPU index."""
    top = (error.name or "").split(".")[0]
    if top not in EXTRAS:
        return None
    extra = EXTRAS[top]
    if extra in TORCH_EXTRAS:
        how = (f"EXTRAS={extra} bash scripts/install.sh in a checkout, or without a GPU pip install torch "
               f"--index-url {TORCH_CPU_INDEX} before pip install 'mixtral-export[{extra}]'")
    else:
        how = f"pip install 'mixtral-export[{extra}]'"
    return f"{needed_by} needs {top}, which is not installed: {how}"
