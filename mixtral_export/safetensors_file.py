"""Reading safetensors files tensor by tensor, with every header fact checked against the file.

Only the JSON header and raw little-endian bytes are read (never a pickle). Tensors are read with
plain file reads straight into their destination, so loading holds one copy of the weights.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from mixtral_export.errors import UserError

DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be loaded; the message names the tensor and/or the file."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int
    path: Path


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and check a safetensors header: a truncated or foreign file fails here, by name."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER or 8 + header_len > size:
                raise CheckpointError(f"{path}: not a safetensors file or truncated "
                                      f"(header of {header_len} bytes in a {size}-byte file)")
            raw = f.read(header_len)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not an object)")
    base = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name} has a malformed header entry") from None
        if dtype not in DTYPE_SIZES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(f"{path}: tensor {name} has {end - begin} bytes for shape "
                                  f"{list(shape)} {dtype}")
        if base + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name} ends at byte {base + end} "
                                  f"but the file has {size}")
        entries[name] = TensorEntry(name, dtype, shape, base + begin, nbytes, path)
    return entries


def read_into(entry: TensorEntry, buffer: memoryview, handle=None) -> None:
    """Fill `buffer` (exactly entry.nbytes) with the tensor's bytes."""
    def fill(f) -> None:
        f.seek(entry.start)
        got = f.readinto(buffer)
        if got != entry.nbytes:
            raise CheckpointError(f"{entry.path}: truncated while reading tensor {entry.name}")

    if handle is not None:
        fill(handle)
    else:
        with open(entry.path, "rb") as f:
            fill(f)
