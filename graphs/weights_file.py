"""Write a graph's external-data file tensor by tensor, hashing as it goes.

Each initializer larger than EXTERNAL_MIN bytes is materialised (a lazy one reads its parameter
from the checkpoint only now; one that comes in pieces, a piece at a time), written, added to
the hash and released before the next, so peak memory is about one tensor or piece whatever
the model's size. One stored in the checkpoint exactly as the graph holds it is copied file to
file by the kernel (`copy_range`: the checkpoint is never mapped); one that is laid out or cast
as it is read (`chunks`) fills a ring of reused buffers that a writing thread takes over while
the next fills (`BufferRing`); one laid out from byte ranges of the checkpoint (gathered experts,
`stored_pieces`) goes from memory maps to `pwritev`. The file is hashed behind the writes, block
by block on a pool of threads (sha256_blocks, graphs/block_hash.py `BlockHasher`), read back
through small maps of the page cache. The layout is onnx_ir's own (`ir.save(...,
external_data=...)`): initializers in graph order, densely packed, the same threshold; so the file is byte for byte what the
exporter's save writes. The graph then points at the file (offset, length) and is saved
without weights.

A write that fails (a full disk, Ctrl-C) raises out of here and the caller's temp folder goes
with it (graphs/artifact_folder.py); a full disk is one ExportError line.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from mixtral_export.graphs.artifact_folder import DISK_FULL, ExportError
from mixtral_export.artifact.block_hash import BlockHasher
from mixtral_export.artifact.manifest import FileEntry

EXTERNAL_MIN = 256  # bytes: onnx_ir's size_threshold_bytes; at most this stays inside model.onnx
WRITE_BYTES = 8 << 20  # the most one write() call hands the kernel (docs/design.md, "The writer")
CHUNK_BYTES = 4 << 20  # one BufferRing buffer: what one read or fill and write() handle
RING = 3  # BufferRing's buffers: one being written while the next is filled
PROGRESS_EVERY = 1.0  # seconds between progress reports


def save_with_weights(model, path: Path, data_name: str,
                      progress: Callable[[str], None] | None = None) -> FileEntry | None:
    """Write `model` (an onnx_ir model) to `path` and its large initializers to `data_name` beside it.

    Returns the data file's manifest entry (size, sha256_blocks), None when nothing is large
    enough to go there. progress gets one line now and then: bytes written, rate and the time left.
    """
    import onnx_ir as ir

    values = [value for value in model.graph.initializers.values()
              if value.const_value is not None and value.const_value.nbytes > EXTERNAL_MIN]
    total = sum(value.const_value.nbytes for value in values)
    if not values:
        ir.save(model, str(path))
        return None
    data_path = path.parent / data_name
    report = Progress(data_name, total, progress)
    offset = 0
    report(0)
    try:
        # every write positional; read back to hash (the hasher's pool goes before the file closes)
        with open(data_path, "w+b", buffering=0) as handle, BlockHasher(handle.fileno()) as hasher, \
                torch_on_one_thread(), heap_frozen():
            ring = BufferRing(hasher, handle.fileno())
            try:
                for value in values:
                    tensor = value.const_value
                    length = write_tensor(tensor, handle, ring)
                    if length != tensor.nbytes:
                        raise ExportError(f"{data_path}: initializer {value.name} gave {length} bytes, "
                                          f"its shape and dtype say {tensor.nbytes}")
                    value.const_value = ir.ExternalTensor(os.path.normpath(data_name), offset, length, tensor.dtype,
                                                          shape=tensor.shape, name=tensor.name,
                                                          base_dir=os.path.normpath(path.parent))
                    offset += length
                    report(offset)
                    del tensor
                    release_freed_memory()
                ring.close()
                root = hasher.root(offset)
            except BaseException:
                ring.close(quiet=True)  # no write of the threads outlives the file (Ctrl-C, a full disk)
                raise
    except OSError as err:
        if err.filename is not None and Path(err.filename) != data_path:  # reading the checkpoint failed
            raise ExportError(f"{err.filename}: cannot read ({err.strerror or err})") from None
        if err.errno in DISK_FULL:
            raise ExportError(f"{data_path}: {err.strerror} after writing {size(offset)} of {size(total)} "
                              f"(the weights need {size(total)} free beside the output)") from None
        raise ExportError(f"{data_path}: cannot write ({err.strerror or err})") from None
    ir.save(model, str(path))
    return FileEntry(offset, root, hasher.block_size)


@contextlib.contextmanager
def torch_on_one_thread():
    """Run torch's ops (casts, transposes, expert layouts) on the writing thread alone while the
    file is written: the hashing threads keep the other cores busy, and torch's intra-op pool then
    waits on descheduled workers (a 2 MB strided copy_ ran at 0.26 GB/s with 2 threads on this
    loaded 2-core machine, 39 GB/s with 1; docs/design.md, "The writer"). torch's thread count is
    the process's: it is set back however the write ends."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def heap_frozen():
    """Keep the garbage collector off the objects that exist before the file is written (the
    traced graph: millions): writing a gathered layout makes thousands of views per run, and each
    collection they trigger used to walk that whole heap (gc was 9% of an export's CPU)."""
    import gc

    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def write_tensor(tensor, handle, ring: BufferRing) -> int:
    """Materialise one tensor (a piece at a time when it comes in pieces) and write its bytes at
    the ring's offset; returns the byte count. One stored in the checkpoint as it is
    written is copied file to file (`copy_range`); one that fills buffers (`chunks(limit)`: a cast,
    a gathered expert layout) is written through `ring`'s reused buffers."""
    ranges = tensor.stored_ranges() if hasattr(tensor, "stored_ranges") else None
    if ranges:
        return sum(copy_range(entry, handle, ring) for entry in ranges)
    pieces = tensor.stored_pieces(CHUNK_BYTES) if hasattr(tensor, "stored_pieces") and GATHER_WRITE else None
    if pieces is not None:
        return write_pieces(pieces, ring)
    if hasattr(tensor, "chunks"):
        return write_chunks(tensor.chunks(CHUNK_BYTES), ring)
    written = 0
    for piece in tensor.pieces() if hasattr(tensor, "pieces") else (tensor,):
        view = memoryview(tensor_bytes(piece)).cast("B")
        written += write_all(ring.fd, view, ring.claim(len(view)))
        ring.wrote()
        del view, piece
    return written


def write_chunks(chunks, ring: BufferRing) -> int:
    """Write (nbytes, fill(dest)) runs: each filled into the ring's next buffer, then written by
    the ring's writing thread while the next one is filled. Returns the byte count."""
    written = 0
    for nbytes, fill in chunks:
        buffer = ring.take(nbytes)
        fill(buffer)
        ring.put(memoryview(buffer.numpy()))
        written += nbytes
    return written


def write_pieces(chunks, ring: BufferRing) -> int:
    """Write runs of checkpoint byte ranges (a gathered expert layout, graphs/onnx_moe.py
    `expert_pieces`: per run, [Rows] whose rows interleave): each run's rows are views of a memory
    map of their shard (page cache, no copy), handed to the kernel in one `pwritev` on the
    writing thread while the next run is mapped. The bytes are copied once, by the kernel, as
    `copy_range` copies them; the maps go once written. Returns the byte count."""
    written = 0
    for runs in chunks:
        ring.take(0)  # a free slot: at most RING runs stay mapped
        views = mapped_rows(runs)
        ring.put_views(views)
        written += sum(run.nbytes * run.count for run in runs)
    return written


def mapped_rows(runs) -> list[memoryview]:
    """A view of every row of `runs` (Rows of one count), interleaved: row 0 of each run, row 1..."""
    columns = []
    for run in runs:
        span = (run.count - 1) * run.stride + run.nbytes
        with open(run.path, "rb", buffering=0) as source:
            mapping, skip = mapped(source, run.start, span,
                                   f"{run.path}: truncated while reading a gathered expert layout")
        whole = memoryview(mapping)
        columns.append([whole[at:at + run.nbytes] for at in range(skip, skip + span, run.stride)])
    return columns[0] if len(columns) == 1 else [view for row in zip(*columns) for view in row]


def write_views(fd: int, views: list[memoryview], offset: int) -> int:
    """pwritev `views` one after another from `offset` of `fd` (IOV_MAX at a time); returns the bytes."""
    done = 0
    for first in range(0, len(views), IOV_MAX):
        batch = views[first:first + IOV_MAX]
        wrote = os.pwritev(fd, batch, offset + done)
        for view in batch:  # a short write: the rest view by view
            if wrote >= len(view):
                wrote -= len(view)
            else:
                write_all(fd, view[wrote:], offset + done + wrote)
                wrote = 0
            done += len(view)
    return done


def write_all(fd: int, view: memoryview, offset: int) -> int:
    """pwrite all of `view` at `offset` of `fd`; returns its length."""
    done = 0
    while done < len(view):  # a few MB per write: one 256 MB write ran at a tenth of the rate
        done += os.pwrite(fd, view[done:done + WRITE_BYTES], offset + done)
    return done


def copy_range(entry, handle, ring: BufferRing) -> int:
    """Copy a checkpoint byte range (a TensorEntry) to the ring's offset with the kernel's
    copy_file_range, CHUNK_BYTES at a time (the checkpoint is never mapped: no page faults; the
    hashing threads read the copy back). Writing through Python ran at 0.3-0.4 GB/s on this
    machine where the kernel's copy ran at 1.3-2.5 GB/s; where the kernel cannot copy (another
    filesystem, no such call), mapped bytes are written, and the ring remembers it for the rest of the file."""
    done = 0
    truncated = f"{entry.path}: truncated while reading tensor {entry.name}"
    with open(entry.path, "rb", buffering=0) as source:
        while done < entry.nbytes:
            got = min(CHUNK_BYTES, entry.nbytes - done)
            at = ring.claim(got)
            copied = 0
            while copied < got and ring.kernel_copy:
                try:
                    step = os.copy_file_range(source.fileno(), ring.fd, got - copied,
                                              entry.start + done + copied, at + copied)
                except OSError as err:
                    if err.errno not in NO_KERNEL_COPY or copied:
                        raise
                    ring.kernel_copy = False
                    break
                if not step:
                    raise ExportError(truncated)
                copied += step
            if copied < got:
                mapping, skip = mapped(source, entry.start + done + copied, got - copied, truncated)
                with memoryview(mapping) as whole:  # the map goes with its last view (a failed write's traceback)
                    write_all(ring.fd, whole[skip:skip + got - copied], at + copied)
            ring.wrote()
            done += got
    return done


def mapped(source, start: int, nbytes: int, truncated: str):
    """(read-only mmap of `source` holding bytes [start, start + nbytes), where they begin in it);
    `truncated`: the one-line error when the file ends before the range does."""
    import mmap

    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    try:
        return mmap.mmap(source.fileno(), start + nbytes - aligned, offset=aligned, access=mmap.ACCESS_READ), \
            start - aligned
    except ValueError:  # the file ends before the range does
        raise ExportError(truncated) from None


class BufferRing:
    """The data file's next offset, RING reused buffers of CHUNK_BYTES, the thread that writes
    (each at its own offset) what the main thread fills into them, and the hasher told how far
    the file is written.

    A buffer is handed out again only once its last write is done, so filling (reading, laying
    out) the next chunk overlaps the write (write(): ~0.8 GB/s) of this one, and nothing is
    allocated per chunk. Every write is positional (pwrite, copy_file_range's destination
    offset): the threads' order does not matter. The writing thread is the ring's own and ends
    with `close()`.
    """

    def __init__(self, hasher: BlockHasher, fd: int):
        import torch

        self.hasher, self.fd, self.offset = hasher, fd, 0
        self.buffers = [torch.empty(CHUNK_BYTES, dtype=torch.uint8) for _ in range(RING)]
        self.pending: list[list] = [[] for _ in range(RING)]
        self.turn = 0
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="pwrite")
        self.kernel_copy = KERNEL_COPY  # False once the kernel refused to copy into this file

    def claim(self, nbytes: int) -> int:
        """The offset of the next nbytes of the file, which are now the caller's to write."""
        at, self.offset = self.offset, self.offset + nbytes
        return at

    def wrote(self) -> None:
        """Everything claimed is written, or is being written by the pending writes: the hasher
        may read each block that ends by now once those are done."""
        self.hasher.written(self.offset, [write for work in self.pending for write in work])

    def take(self, nbytes: int):
        """The next buffer's first nbytes (a uint8 tensor), once its last write is done."""
        self.turn = (self.turn + 1) % RING
        self._wait(self.turn)
        return self.buffers[self.turn][:nbytes]

    def put(self, view: memoryview) -> None:
        """Write `view` (of the buffer last taken) at the next offset, on the writing thread."""
        at = self.claim(len(view))
        self.pending[self.turn] = [self.writer.submit(write_all, self.fd, view, at)]
        self.wrote()

    def put_views(self, views: list[memoryview]) -> None:
        """pwritev `views` (of maps the caller dropped) at the next offset on the writing thread:
        the views, and with them the maps, go once written."""
        at = self.claim(sum(len(view) for view in views))
        self.pending[self.turn] = [self.writer.submit(write_views, self.fd, views, at)]
        self.wrote()

    def close(self, quiet: bool = False) -> None:
        """Wait for every write, then end the writing thread; quiet: whatever the writes raise (the
        caller is failing already)."""
        try:
            for turn in range(RING):
                try:
                    self._wait(turn)
                except Exception:
                    if not quiet:
                        raise
        finally:
            self.writer.shutdown(wait=True)

    def _wait(self, turn: int) -> None:
        work, self.pending[turn] = self.pending[turn], []
        for future in work:
            future.result()


NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}
KERNEL_COPY = hasattr(os, "copy_file_range")  # the platform has it (a filesystem may still refuse)
GATHER_WRITE = hasattr(os, "pwritev")  # else gathered layouts fill the ring's buffers (`write_chunks`)
IOV_MAX = 1024  # Linux's UIO_MAXIOV: the most buffers one pwritev takes


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing).

    Tensors of a few tens of MB land in malloc's heap once its mmap threshold has risen past
    them; freed, they fragment it, and without this the resident size creeps up layer by layer.
    """
    trim = malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def malloc_trim():
    """glibc's malloc_trim, or None without glibc; looked up once (the C library never changes)."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def tensor_bytes(tensor):
    """A tensor's little-endian bytes as a buffer, without the copy tobytes() makes of a big one."""
    import onnx_ir as ir
    import torch

    while isinstance(tensor, ir.LazyTensor):
        tensor = tensor.raw()  # the LazyTensor's function: evaluate it now, once
    raw = tensor if isinstance(tensor, torch.Tensor) else getattr(tensor, "raw", None)
    if isinstance(raw, torch.Tensor):
        return raw.detach().contiguous().view(-1).view(torch.uint8).numpy()
    if isinstance(raw, np.ndarray) and raw.dtype.byteorder in ("=", "<", "|"):
        return np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    return tensor.tobytes()


def size(n: int) -> str:
    """Bytes as people read them: 93.41 GB, 1.4 MB, 12 kB."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


class Progress:
    """Turns bytes written into a progress line (at most once a second, and at the end)."""

    def __init__(self, name: str, total: int, say: Callable[[str], None] | None):
        self.name, self.total, self.say = name, total, say
        self.start = self.last = time.monotonic()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if self.say is None or (0 < done < self.total and now - self.last < PROGRESS_EVERY):
            return  # the first line (0 bytes) and the last always come
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("inf")
        self.say(f"writing {self.name}: {size(done)} of {size(self.total)}, {rate / 1e6:.0f} MB/s, "
                 f"{duration(left)} left")


def duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown time"
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"
