"""Writing the weights: progress in bytes with the time left; a full disk or Ctrl-C mid-write fails
in one line (or as the interrupt) and leaves nothing behind."""
from __future__ import annotations

import errno
import functools
import os
import subprocess
import threading

import pytest

from mixtral_export.graphs import weights_file
from mixtral_export.artifact.block_hash import BlockHasher
from mixtral_export.graphs.onnx_export import ExportError, export_onnx
from tests.test_cli import assert_one_line_error, cli

SHAPES = dict(batch=2, prefill_chunk=8, cache_slots=32)


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB tmpfs: room for the tiny graph, not for its 1.4 MB of weights (needs root)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_fails_in_one_line_and_leaves_nothing(tiny_checkpoint, small_disk):
    run = cli("export", tiny_checkpoint, "-o", small_disk / "art", "--batch", "2", "--prefill-chunk", "8", ok=False)
    assert_one_line_error(run, str(small_disk / "art" / "model.onnx.data"), "No space left on device", "of 1.4 MB")
    assert os.listdir(small_disk) == []


def failing_write(error: BaseException, after: int):
    """write_tensor that writes `after` tensors, then raises `error` (a disk filling, a Ctrl-C)."""
    real, calls = weights_file.write_tensor, []

    def write_tensor(tensor, handle, ring):
        calls.append(tensor.name)
        if len(calls) > after:
            raise error
        return real(tensor, handle, ring)
    return write_tensor


@pytest.mark.parametrize("error, raised", [(OSError(errno.ENOSPC, "No space left on device"), ExportError),
                                           (KeyboardInterrupt(), KeyboardInterrupt)])
def test_a_write_failing_midway_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch, error, raised):
    """Blocks of 4 kB: the hashing threads have blocks queued and running when the write fails;
    none of them outlives the cleanup."""
    monkeypatch.setattr(weights_file, "write_tensor", failing_write(error, after=3))
    monkeypatch.setattr(weights_file, "BlockHasher", functools.partial(BlockHasher, block_size=4096, threads=2))
    with pytest.raises(raised) as info:
        export_onnx(tiny_checkpoint, tmp_path / "art", **SHAPES)
    assert list(tmp_path.iterdir()) == []
    assert not [thread.name for thread in threading.enumerate() if thread.name.startswith("block-hash")]
    if raised is ExportError:
        assert "\n" not in str(info.value) and "No space left on device after writing" in str(info.value)


def test_progress_counts_bytes_and_the_time_left(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(weights_file, "PROGRESS_EVERY", 0.0)
    lines = []
    export_onnx(tiny_checkpoint, tmp_path / "art", progress=lines.append, **SHAPES)
    writing = [line for line in lines if line.startswith("writing model.onnx.data")]
    assert len(writing) > 5 and all(" of 1.4 MB" in line and " left" in line for line in writing)
    assert writing[-1].endswith(", 0 s left")


def test_progress_line_reads_like_a_person_would_write_it():
    said = []
    report = weights_file.Progress("model.onnx.data", 93_000_000_000, said.append)
    report.start -= 100  # 100 s in
    report.last -= 100
    report(20_000_000_000)
    assert said == ["writing model.onnx.data: 20.00 GB of 93.00 GB, 200 MB/s, 6 min 05 s left"]
