"""Make the weights ONNX Runtime memory-maps resident when a session opens, not when a step needs them.

ONNX Runtime maps external data files into memory (private file mappings) and reads a page when a
kernel first touches it. Weights it repacks (MatMul's B) are copied at load, but the MoE node's
experts are read in place, so with gathered routing an expert's 235 MB (fp32, 8x7B) come off the
disk during the first step that routes a token to it: the first tokens stall, and after something
else has pushed the file out of the page cache (measured: 2.3 of 6.4 GB gone after transformers
loaded beside it) steps stall again at random. So the backend asks the kernel to fill every page
of those mappings at open: one `madvise(MADV_POPULATE_READ)` per mapping (Linux >= 5.14), or, where
that is refused, one sequential read of the file (the page cache then serves the faults).
Nothing is copied: the pages are the page cache's, shared with any other process mapping the file
(and, like any clean page cache page, reclaimable under memory pressure: this is not mlock).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

MADV_POPULATE_READ = 22  # linux/mman.h, Linux 5.14+
READ_CHUNK = 16 << 20


def make_resident(files: list[Path]) -> int:
    """Fault in every page this process maps from `files`; returns the bytes made resident."""
    if not sys.platform.startswith("linux"):
        return 0
    wanted = {os.path.realpath(f) for f in files}
    mappings = [(start, end, path) for start, end, path in file_mappings() if path in wanted]
    populate = madvise_function()
    done, refused = 0, set()
    for start, end, path in mappings:
        if populate is not None and populate(ctypes.c_void_p(start), ctypes.c_size_t(end - start),
                                             MADV_POPULATE_READ) == 0:
            done += end - start
        else:
            refused.add(path)
    for path in refused:  # an older kernel: warm the page cache instead
        done += read_through(Path(path))
    return done


def file_mappings() -> list[tuple[int, int, str]]:
    """(start, end, path) of every file-backed mapping of this process."""
    out = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                out.append((start, end, fields[5].rstrip("\n")))
    return out


def madvise_function():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    madvise = libc.madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise


def read_through(path: Path) -> int:
    buffer = bytearray(READ_CHUNK)
    total = 0
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            total += n
    return total
