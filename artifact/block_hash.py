"""sha256_blocks: the hash of an artifact's files, computed on many cores at once.

A file is cut into blocks of block_size bytes (the last may be shorter; an empty file has none).
Each block's sha256 is computed on its own; the root is the sha256 of the blocks' 32-byte
digests concatenated in order (an empty file: the sha256 of no bytes). A whole-file sha256 is
sequential, one core at ~1.7 GB/s here, slower than the kernel copies from the page cache;
blocks hash on `hash_threads()` threads at once (hashlib lets go of the GIL), each reading its
block through small read-only maps of the page cache (no copy). The
export hashes blocks behind its writes (`BlockHasher`); verify hashes a finished file
(`hash_file`). docs/design.md, "Artifact hashes", checks one with split and sha256sum.
"""
from __future__ import annotations

import hashlib
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BLOCK_BYTES = 64 << 20  # docs/design.md "Artifact hashes": block size against hash rate
MAP_BYTES = 8 << 20  # one map of a block, hashed and unmapped
MAX_THREADS = 16
LAG_BLOCKS = 4  # per thread: how many written blocks may wait for their hash before the writer waits


def hash_threads() -> int:
    """The hashing threads: one per core, capped (past ~16 the disk or memory bus is the limit)."""
    return max(1, min(os.cpu_count() or 1, MAX_THREADS))


def hash_file(path: str | Path, block_size: int = BLOCK_BYTES) -> str:
    """The sha256_blocks root of a whole file."""
    with open(path, "rb", buffering=0) as handle, BlockHasher(handle.fileno(), block_size) as hasher:
        return hasher.root(os.fstat(handle.fileno()).st_size)


def hash_block(fd: int, start: int, end: int) -> bytes:
    """sha256 of bytes [start, end) of the open file `fd`, through read-only maps of MAP_BYTES
    (each unmapped once hashed: at most one per thread in the resident size). Cheaper than pread
    into a buffer: 0.60 s of CPU per GB here against 0.76-0.80 s (docs/design.md, "Artifact hashes")."""
    digest = hashlib.sha256()
    while start < end:
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        stop = min(end, aligned + MAP_BYTES)
        try:
            window = mmap.mmap(fd, stop - aligned, offset=aligned, access=mmap.ACCESS_READ)
        except ValueError:  # the file is shorter than its entry or its writer says
            raise OSError(f"the file ended before byte {stop} while hashing it") from None
        with window, memoryview(window) as view:
            digest.update(view[start - aligned:])
        start = stop
    return digest.digest()


class BlockHasher:
    """Hashes the blocks of a file as they are written, on a pool of threads, behind the writer.

    The writer says how far the file is written (`written(offset, after)`): each block that ends
    by then is queued, to be read once `after` (the writes still in flight) are done. At most
    LAG_BLOCKS per thread wait at a time (the writer then waits), so blocks are read while the
    page cache still holds them. `root(size)` adds the last, shorter block and returns the root.
    A context manager: on exit, queued blocks are dropped and running ones finish, so no thread
    reads the file once it is closed or removed (Ctrl-C, a full disk).
    """

    def __init__(self, fd: int, block_size: int = BLOCK_BYTES, threads: int | None = None):
        threads = threads or hash_threads()
        self.fd, self.block_size, self.lag = fd, block_size, LAG_BLOCKS * threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="block-hash")
        self.blocks: list = []  # futures of the digests of blocks 0, 1, ...

    def __enter__(self) -> BlockHasher:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def written(self, offset: int, after=()) -> None:
        """Bytes [0, offset) are written, or will be once the futures `after` are done."""
        after = tuple(after)
        while (len(self.blocks) + 1) * self.block_size <= offset:
            start = len(self.blocks) * self.block_size
            self.blocks.append(self.pool.submit(self._hash, start, start + self.block_size, after))
        if len(self.blocks) > self.lag:
            self.blocks[-self.lag - 1].result()

    def root(self, size: int) -> str:
        """The root of the file's first `size` bytes, all written (waits for every block)."""
        self.written(size)
        digests = [block.result() for block in self.blocks]
        if size > len(digests) * self.block_size:
            digests.append(hash_block(self.fd, len(digests) * self.block_size, size))
        return hashlib.sha256(b"".join(digests)).hexdigest()

    def _hash(self, start: int, end: int, after) -> bytes:
        for write in after:
            write.result()
        return hash_block(self.fd, start, end)
