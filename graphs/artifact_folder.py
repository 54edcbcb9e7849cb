"""Writing an artifact folder atomically, whatever builds it (ONNX export, AOTI package).

Everything is written into a hidden temp folder beside the target, the manifest last, and the
folder is renamed into place; any failure (or Ctrl-C) removes the temp folder, so the target
either holds a complete, hashed artifact or is untouched. An earlier artifact is swapped out only
once the new one is complete.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mixtral_export.artifact.manifest import MANIFEST_NAME, write_manifest
from mixtral_export.artifact.config import MixtralConfig
from mixtral_export.destinations import replace_folder
from mixtral_export.errors import UserError

COPIED_FILES = ("tokenizer.model", "generation_config.json")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a write that failed for want of space


class ExportError(UserError, RuntimeError):
    """An export that cannot start or did not produce a valid artifact; one line naming the path."""


@contextmanager
def building(out: Path) -> Iterator[Path]:
    """Yield a temp folder to build into; on success it becomes `out`, on any failure it is gone."""
    check_destination(out)
    tmp = temp_folder_name(out)  # named before it exists, so a Ctrl-C right after mkdir still removes it
    try:
        make_temp_folder(out, tmp)
        yield tmp
        os.chmod(tmp, 0o755)  # made private; the artifact is meant to be shared
        replace_folder(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in DISK_FULL:
            raise ExportError(f"{out}: {err.strerror} while writing the artifact; nothing was left behind") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finish(tmp: Path, checkpoint: Path, config: MixtralConfig, **manifest_fields) -> None:
    """Copy the tokenizer and generation config beside the graphs, then write the manifest last."""
    copied = copy_side_files(checkpoint, tmp)
    bos, eos = generation_ids(tmp / "generation_config.json", config)
    write_manifest(tmp, config=config, tokenizer="tokenizer.model" if "tokenizer.model" in copied else None,
                   bos_token_id=bos, eos_token_id=eos, source=checkpoint.resolve(), **manifest_fields)


def check_destination(out: Path) -> None:
    """Refuse to replace anything but a missing or empty folder, or an earlier artifact whose
    manifest lists every file in it (a file of the user's beside an artifact is never deleted)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"{out}: exists and is not a folder; refusing to overwrite it")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    try:
        raw = json.loads((out / MANIFEST_NAME).read_text())
        listed = set(raw["files"]) | {entry["folder"] for entry in raw.get("stages", ())}  # a staged artifact's
    except (OSError, ValueError, KeyError, TypeError):
        raise ExportError(f"{out}: exists and is not an artifact (no readable {MANIFEST_NAME}); "
                          f"refusing to overwrite it") from None
    foreign = [name for name in entries if name != MANIFEST_NAME and name not in listed]
    if foreign:
        raise ExportError(f"{out}: holds {foreign[0]}, which its {MANIFEST_NAME} does not list; "
                          f"refusing to overwrite it (move it away or choose another --output)")


def temp_folder_name(out: Path) -> Path:
    """A hidden name beside `out` for the folder the artifact is built in (128 random bits: never an
    existing folder, so the cleanup can only remove what this export made)."""
    return out.parent / f".{out.name}.partial-{secrets.token_hex(16)}"


def make_temp_folder(out: Path, tmp: Path) -> None:
    """Create `tmp` (private until the artifact is complete)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(mode=0o700)
    except OSError as err:
        raise ExportError(f"{out}: cannot write the artifact there ({err.strerror or err})") from None


def copy_side_files(checkpoint: Path, dest: Path) -> list[str]:
    copied = []
    for name in COPIED_FILES:
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, dest / name)
            copied.append(name)
    return copied


def generation_ids(path: Path, config: MixtralConfig) -> tuple[int | None, tuple[int, ...]]:
    """BOS/EOS ids: generation_config.json's where it sets them (chat models add EOS ids), else the config's."""
    bos, eos = config.bos_token_id, config.eos_token_id
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ExportError(f"{path}: not valid JSON ({err})") from None
        bos = raw.get("bos_token_id", bos)
        found = raw.get("eos_token_id")
        if found is not None:
            eos = tuple(found) if isinstance(found, list) else (found,)
    return bos, eos
