"""ONNX Runtime's memory-mapped weights are paged in when a backend opens, not during the first steps."""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from mixtral_export.runtimes import resident_weights
from mixtral_export.runtimes.resident_weights import make_resident

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
    from mixtral_export.runtimes.ort import OrtBackend
    from mixtral_export.runtimes.resident_weights import file_mappings

    data = os.path.realpath(tiny_onnx / "model.onnx.data")
    assert OrtBackend(tiny_onnx, verify_files=False, preload=False).resident_bytes == 0
    backend = OrtBackend(tiny_onnx, verify_files=False)
    mapped = sum(end - start for start, end, path in file_mappings() if path == data)
    assert mapped > 0 and backend.resident_bytes == mapped


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def smaps_fields(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds `address`."""
    fields, inside = {}, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                if inside:
                    break
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside:
                fields[head.rstrip(":")] = line.split(maxsplit=1)[1].strip()
    return fields


def collapse_works() -> bool:
    """Whether this kernel moves a written anonymous buffer onto huge pages when asked."""
    if not THP.exists() or "[never]" in THP.read_text():
        return False
    size = resident_weights.COLLAPSE_AT_LEAST + (4 << 20)  # as the test buffers
    with mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as probe:
        view = np.frombuffer(probe, dtype=np.uint8)
        view[:] = 1
        madvise = resident_weights.madvise_function()
        ok = madvise(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), resident_weights.MADV_COLLAPSE) == 0
        del view
        return ok


def anonymous_buffer(size: int, written: bool) -> tuple[mmap.mmap, np.ndarray]:
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # as malloc's: not shared memory
    view = np.frombuffer(buffer, dtype=np.uint8)
    if written:
        view[:] = 1
    return buffer, view


@pytest.mark.skipif(not THP.exists(), reason="kernel without transparent huge pages")
def test_mapped_weights_are_advised_onto_huge_pages(weights_file):
    with open(weights_file, "rb") as handle, mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        view = np.frombuffer(mapped, dtype=np.uint8)
        address = view.ctypes.data
        assert "hg" not in smaps_fields(address)["VmFlags"].split()
        make_resident([weights_file])
        assert "hg" in smaps_fields(address)["VmFlags"].split()
        del view


def test_a_written_buffer_allocated_since_the_snapshot_moves_to_huge_pages():
    if not collapse_works():
        pytest.skip("transparent huge pages off, or a kernel without MADV_COLLAPSE (< 6.1)")
    before = resident_weights.anonymous_mappings()
    buffer, view = anonymous_buffer(resident_weights.COLLAPSE_AT_LEAST + (4 << 20), written=True)
    assert int(smaps_fields(view.ctypes.data)["AnonHugePages"].split()[0]) == 0
    assert resident_weights.collapse_new_buffers(before, [view.nbytes]) >= view.nbytes
    assert int(smaps_fields(view.ctypes.data)["AnonHugePages"].split()[0]) > 0
    assert (view == 1).all()
    del view
    buffer.close()


def test_a_buffer_merged_into_an_older_mapping_counts_as_new(monkeypatch):
    """The kernel merges a new anonymous mapping into an adjacent one with the same flags: only the
    part that was not mapped before is new (what failed in CI: the grown mapping looked old)."""
    before = {(0x1000, 0x5000), (0x9000, 0xA000)}
    monkeypatch.setattr(resident_weights, "anonymous_mappings",
                        lambda: {(0x0000, 0x5000), (0x8000, 0xC000), (0xD000, 0xE000)})
    assert resident_weights.new_ranges(before) == [(0x0000, 0x1000), (0x8000, 0x9000), (0xA000, 0xC000),
                                                   (0xD000, 0xE000)]


def resident_bytes(view: np.ndarray) -> int:
    """mincore over the pages of `view`: how much of it is backed by memory."""
    start = view.ctypes.data
    pages = (view.nbytes + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(view.nbytes), vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) * mmap.PAGESIZE


def test_a_sparsely_touched_new_buffer_is_not_filled_in():
    before = resident_weights.anonymous_mappings()
    reserve, view = anonymous_buffer(resident_weights.COLLAPSE_AT_LEAST + (4 << 20), written=False)
    view[::1 << 20] = 1  # one page per MiB, as an arena's reserve: collapsing would fill in the rest
    touched = resident_bytes(view)
    resident_weights.collapse_new_buffers(before, [view.nbytes])
    assert resident_bytes(view) == touched
    del view
    reserve.close()


def test_a_buffer_older_than_the_snapshot_is_left_alone():
    older, view = anonymous_buffer(resident_weights.COLLAPSE_AT_LEAST + (4 << 20), written=True)
    resident_weights.collapse_new_buffers(resident_weights.anonymous_mappings(), [view.nbytes])
    assert int(smaps_fields(view.ctypes.data)["AnonHugePages"].split()[0]) == 0
    del view
    older.close()


def test_a_new_buffer_of_another_size_is_left_alone():
    """Another thread's allocation while a session opens is new too: only the session's sizes are collapsed."""
    if not collapse_works():
        pytest.skip("transparent huge pages off, or a kernel without MADV_COLLAPSE (< 6.1)")
    before = resident_weights.anonymous_mappings()
    buffer, view = anonymous_buffer(resident_weights.COLLAPSE_AT_LEAST + (4 << 20), written=True)
    assert resident_weights.collapse_new_buffers(before, [view.nbytes // 2 + (1 << 20)]) == 0
    assert int(smaps_fields(view.ctypes.data)["AnonHugePages"].split()[0]) == 0
    del view
    buffer.close()


def test_a_range_is_attributed_by_its_allocations_sizes():
    b, slack = 48 << 20, resident_weights.ALLOCATION_SLACK
    assert resident_weights.sized_as(b, [b]) and resident_weights.sized_as(b + 4096, [1 << 20, b])
    assert resident_weights.sized_as(3 * (b + 4096), [b])  # three merged by the kernel into one mapping
    assert not resident_weights.sized_as(b - 1, [b]) and not resident_weights.sized_as(b + slack + 1, [b])
    assert not resident_weights.sized_as(b + b // 2, [b]) and not resident_weights.sized_as(b, [])


def test_onnx_runtimes_prepacked_weight_is_found_by_its_size(tmp_path):
    """What ONNX Runtime allocates for a MatMul weight at load is recognised by the weight's size
    alone, and collapsed; named with another size, it is left alone."""
    if not collapse_works():
        pytest.skip("transparent huge pages off, or a kernel without MADV_COLLAPSE (< 6.1)")
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = 1024, 10240  # 40 MiB of float32: above COLLAPSE_AT_LEAST
    weight = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)  # (K, N)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "prepack",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(weight, "w")])
    path = tmp_path / "matmul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path,
              save_as_external_data=True, location="matmul.data")
    sessions = []
    for sizes, expected in (([weight.nbytes + (1 << 20)], 0), ([weight.nbytes], weight.nbytes)):
        before = resident_weights.anonymous_mappings()
        sessions.append(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
        collapsed = resident_weights.collapse_new_buffers(before, sizes)
        assert expected <= collapsed <= expected + resident_weights.ALLOCATION_SLACK, (sizes, collapsed)
