"""ONNX Runtime's memory-mapped weights are paged in when a backend opens, not during the first steps."""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from runtimes import resident_weights
from runtimes.resident_weights import make_resident

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux page-cache behaviour")


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (written back first: dirty pages stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if resident_fraction(path) > 0.5:
        pytest.skip(f"{path.parent} keeps files in memory (tmpfs?): page-cache eviction cannot be observed")


def resident_fraction(path: Path) -> float:
    """mincore over a fresh read-only mapping of the whole file: which pages the page cache holds."""
    size = path.stat().st_size
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), size, prot=mmap.PROT_READ) as mapped:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        view = np.frombuffer(mapped, dtype=np.uint8)
        address = view.ctypes.data
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec) == 0, ctypes.get_errno()
        del view
        return sum(v & 1 for v in vec) / pages


@pytest.fixture
def weights_file(tmp_path) -> Path:
    path = tmp_path / "weights.data"
    path.write_bytes(np.random.default_rng(0).integers(0, 255, size=8 << 20, dtype=np.uint8).tobytes())
    evict(path)
    return path


def test_mapped_file_is_paged_in(weights_file):
    with open(weights_file, "rb") as handle, mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ):
        assert resident_fraction(weights_file) < 0.5
        assert make_resident([weights_file]) == weights_file.stat().st_size
        assert resident_fraction(weights_file) == 1.0


def test_unmapped_file_is_left_alone(weights_file, tmp_path):
    assert make_resident([weights_file]) == 0
    assert resident_fraction(weights_file) < 0.5


def test_a_kernel_without_populate_reads_the_file_through(weights_file, monkeypatch):
    monkeypatch.setattr(resident_weights, "madvise_function", lambda: None)
    with open(weights_file, "rb") as handle, mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ):
        assert make_resident([weights_file]) == weights_file.stat().st_size
        assert resident_fraction(weights_file) == 1.0


def test_ort_backend_pages_in_every_mapping_of_its_weights(tiny_onnx):
    from runtimes.ort import OrtBackend
    from runtimes.resident_weights import file_mappings

    data = os.path.realpath(tiny_onnx / "model.onnx.data")
    assert OrtBackend(tiny_onnx, verify_files=False, preload=False).resident_bytes == 0
    backend = OrtBackend(tiny_onnx, verify_files=False)
    mapped = sum(end - start for start, end, path in file_mappings() if path == data)
    assert mapped > 0 and backend.resident_bytes == mapped
