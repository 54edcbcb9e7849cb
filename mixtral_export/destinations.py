"""Where commands write: only over what this tool wrote itself, and never half a file.

No command deletes or overwrites anything it did not create. An existing destination is replaced
only when it carries our mark: an artifact whose manifest lists every file beside it, a checkpoint
whose safetensors metadata names us, a report whose JSON (or PNG text chunk) says who wrote it.
Anything else is refused in one line. Files are written to a temp path beside the target and
renamed into place, so a failure or Ctrl-C leaves the old file or nothing, never a torn one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from mixtral_export.errors import UserError

WRITER = "mixtral-export"  # the mark: {"written_by": "mixtral-export <what>"} in JSON, metadata elsewhere


class DestinationError(UserError, ValueError):
    """A destination that holds something of the user's; one line naming it."""


def refuse(path: Path, why: str) -> DestinationError:
    return DestinationError(f"{path}: {why}; refusing to overwrite it (choose another path or move it away)")


def check_file(path: str | Path, is_ours: Callable[[Path], bool]) -> Path:
    """Raise unless `path` is free (absent, or an empty file: nothing to lose, as a caller's fresh temp
    file) or a file `is_ours` recognises; commands call it before long work."""
    path = Path(path)
    if path.is_symlink() or path.is_dir():
        raise refuse(path, "exists and is not a plain file")
    if path.exists() and path.stat().st_size > 0 and not is_ours(path):
        raise refuse(path, f"exists and was not written by {WRITER}")
    return path


def write_file(path: str | Path, data: bytes | str, is_ours: Callable[[Path], bool]) -> Path:
    """Write `data` to `path` atomically; an existing file must be one `is_ours` recognises."""
    path = check_file(path, is_ours)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def replace_folder(new: Path, folder: Path) -> None:
    """Rename `new` to `folder`, swapping out an earlier checkpoint of ours only once `new` is complete."""
    if not folder.exists():
        os.replace(new, folder)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
    os.replace(folder, old / folder.name)
    try:
        os.replace(new, folder)
    except BaseException:
        os.replace(old / folder.name, folder)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def write_report(path: str | Path, report: dict, what: str) -> Path:
    """A JSON report marked {"written_by": "mixtral-export <what>"}; replaces only an earlier one."""
    return write_file(path, json.dumps({"written_by": f"{WRITER} {what}", **report}, indent=2) + "\n",
                      report_is_ours(what))


def report_is_ours(what: str) -> Callable[[Path], bool]:
    return lambda old: json_mark(old) == f"{WRITER} {what}"


def json_mark(path: Path) -> str | None:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return raw.get("written_by") if isinstance(raw, dict) else None


def png_is_ours(path: Path) -> bool:
    """A PNG whose text chunks (written before the image data) name us as its software."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 16)
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and f"Software\0{WRITER}".encode() in head
