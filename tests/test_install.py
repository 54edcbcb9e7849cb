"""scripts/install.sh picks the right PyTorch for the machine, decided without waiting on any server.

The script runs against a stand-in Python that records every pip command instead of installing, on
a PATH with or without nvidia-smi, so each machine kind's branch is exercised here in a second.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
if [ "$1" = "-c" ]; then exit "$HAS_TORCH"; fi
case "$*" in *--dry-run*--no-index*) exit "$LOCAL_WHEEL";; esac
exit 0
"""


def install(tmp_path: Path, has_torch: bool, local_wheel: bool, gpu: bool) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    if gpu:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    log = tmp_path / "log"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHON": str(python), "FAKE_LOG": str(log),
           "HAS_TORCH": "0" if has_torch else "1", "LOCAL_WHEEL": "0" if local_wheel else "1"}
    subprocess.run(["bash", "scripts/install.sh"], cwd=REPO, env=env, check=True, capture_output=True, timeout=60)
    return [line for line in log.read_text().splitlines() if "--dry-run" not in line and line != "-c import torch"]


@pytest.mark.parametrize("gpu", [False, True])
def test_an_installed_torch_is_kept(tmp_path, gpu):
    assert install(tmp_path, has_torch=True, local_wheel=False, gpu=gpu) == ["-m pip install -q -e .[test]"]


def test_a_local_wheel_is_used_without_asking_an_index(tmp_path):
    torch, extras = install(tmp_path, has_torch=False, local_wheel=True, gpu=False)
    assert torch == "-m pip install -q torch==2.13.0" and extras == "-m pip install -q -e .[test]"


def test_a_cpu_machine_gets_pytorchs_cpu_build(tmp_path):
    torch, _ = install(tmp_path, has_torch=False, local_wheel=False, gpu=False)
    assert torch == "-m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"


def test_a_gpu_machine_gets_the_cuda_build(tmp_path):
    torch, _ = install(tmp_path, has_torch=False, local_wheel=False, gpu=True)
    assert torch == "-m pip install -q torch==2.13.0"


def test_the_local_wheel_probe_asks_no_server():
    script = (REPO / "scripts" / "install.sh").read_text()
    probe = next(line for line in script.splitlines() if "--dry-run" in line)
    assert "--no-index" in probe and "--no-deps" in probe
