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

A decode step streams gigabytes of weights, so the page size shows: with 4 KiB pages every 4 KiB
read needs its own TLB entry, and a page walk is one more memory access queued behind the stream
(measured here: a 2 GiB read-only pass is ~3% faster on 2 MiB pages). So the mappings are advised
MADV_HUGEPAGE before they are populated (pages read in then come as 2 MiB folios where the file
system can: ext4 on Linux >= 6.16, and they are mapped whole), and `collapse_new_buffers` moves the
large buffers the session allocated itself (ONNX Runtime's prepacked MatMul weights: the lm_head,
attention) onto huge pages with MADV_COLLAPSE (Linux >= 6.1). Both are hints: where transparent
huge pages are off or the kernel is older they are refused and nothing changes.

Memory that appeared while the session opened is not all the session's: in a server other threads
allocate too. So a new range is collapsed only when its size is that of a buffer the session was
going to allocate (the caller names the sizes: a prepacked weight's bytes), or of a run of them
the kernel merged into one mapping; anything else is left as it is.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import sys
from pathlib import Path
from typing import Collection

MADV_HUGEPAGE = 14  # linux/mman.h
MADV_POPULATE_READ = 22  # Linux 5.14+
MADV_COLLAPSE = 25  # Linux 6.1+
COLLAPSE_AT_LEAST = 32 << 20  # smaller buffers are not weights worth a copy
ALLOCATION_SLACK = 64 << 10  # address space an allocation takes beyond its bytes: malloc's header, alignment, pages
READ_CHUNK = 16 << 20


def make_resident(files: list[Path]) -> int:
    """Fault in every page this process maps from `files`; returns the bytes made resident."""
    if not sys.platform.startswith("linux"):
        return 0
    wanted = {os.path.realpath(f) for f in files}
    mappings = [(start, end, path) for start, end, path in file_mappings() if path in wanted]
    madvise = madvise_function()
    done, refused = 0, set()
    for start, end, path in mappings:
        if madvise is not None:
            madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE)  # a hint: may be refused
        if madvise is not None and madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start),
                                           MADV_POPULATE_READ) == 0:
            done += end - start
        else:
            refused.add(path)
    for path in refused:  # an older kernel: warm the page cache instead
        done += read_through(Path(path))
    return done


def anonymous_mappings() -> set[tuple[int, int]]:
    """(start, end) of every anonymous mapping of this process: take one before a session opens."""
    return {(start, end) for start, end, path in all_mappings() if not path}


def new_ranges(before: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """The anonymous address ranges mapped since `before`. The kernel merges a new anonymous mapping
    into an adjacent old one with the same flags, so a new buffer can show up as part of a grown
    mapping: subtract the old ranges instead of comparing whole mappings."""
    old = sorted(before)
    out = []
    for start, end in sorted(anonymous_mappings()):
        cursor = start
        for old_start, old_end in old:
            if old_end <= cursor or old_start >= end:
                continue
            if old_start > cursor:
                out.append((cursor, old_start))
            cursor = max(cursor, old_end)
        if cursor < end:
            out.append((cursor, end))
    return out


def collapse_new_buffers(before: set[tuple[int, int]], sizes: Collection[int]) -> int:
    """Move each large, fully written anonymous range mapped since `before` that holds buffers of
    `sizes` bytes (`sized_as`) onto huge pages (MADV_COLLAPSE copies it into 2 MiB pages: measured
    ~2 s per GB here); returns the bytes collapsed."""
    if not sys.platform.startswith("linux"):
        return 0
    madvise = madvise_function()
    if madvise is None:
        return 0
    done = 0
    for start, end in new_ranges(before):
        size = end - start
        if size < COLLAPSE_AT_LEAST or not sized_as(size, sizes) or not fully_resident(start, size):
            continue  # small, someone else's, or partly untouched (an arena's reserve): collapsing would fill it in
        madvise(ctypes.c_void_p(start), ctypes.c_size_t(size), MADV_HUGEPAGE)
        for _ in range(3):  # EAGAIN: a page was briefly locked or no huge page was free yet
            if madvise(ctypes.c_void_p(start), ctypes.c_size_t(size), MADV_COLLAPSE) == 0:
                done += size
                break
            if ctypes.get_errno() != errno.EAGAIN:
                break
    return done


def sized_as(size: int, sizes: Collection[int]) -> bool:
    """Whether a range of `size` bytes is one allocation of some b in `sizes`, or a run of m of them
    merged by the kernel: between m * b and m * (b + ALLOCATION_SLACK) bytes."""
    return any(b > 0 and size // b >= 1 and size <= size // b * (b + ALLOCATION_SLACK) for b in sizes)


def fully_resident(start: int, size: int) -> bool:
    """mincore over [start, start + size): whether every page is backed by memory."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(size), vec) != 0:
        return False
    return 0 not in bytes(vec)  # bit 0 of each byte: resident; the other bits are reserved (zero)


def file_mappings() -> list[tuple[int, int, str]]:
    """(start, end, path) of every file-backed mapping of this process."""
    return [(start, end, path) for start, end, path in all_mappings() if path.startswith("/")]


def all_mappings() -> list[tuple[int, int, str]]:
    """(start, end, path) of every mapping of this process; path "" for anonymous memory, and
    names like "[heap]" or "[stack]" for the kernel's own."""
    out = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end, fields[5].rstrip("\n") if len(fields) == 6 else ""))
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
