"""The AOTInductor artifact: built once per session, equal to eager, refused when tampered with."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mixtral_export.artifact.contract import NO_POSITION
from mixtral_export.artifact.manifest import ManifestError, load_manifest
from mixtral_export.runtimes.step_parity import lockstep
from tests.test_compiled import DECODE_STEPS

TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_aoti(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny model as an AOTI artifact: fp32, batch 2, prefill chunk 16, a 32-slot ring, CPU."""
    from mixtral_export.graphs.aoti_export import export_aoti

    return export_aoti(tiny_checkpoint, tmp_path_factory.mktemp("aoti") / "tiny-fp32", batch=2,
                       prefill_chunk=16, cache_slots=32)


@pytest.fixture
def tampered(tiny_aoti, tmp_path) -> Path:
    """A private copy of the artifact to damage."""
    return Path(shutil.copytree(tiny_aoti, tmp_path / "copy"))


def test_artifact_holds_one_package_with_both_chunk_models_and_weights_once(tiny_aoti):
    manifest = load_manifest(tiny_aoti)
    assert manifest.kind == "aoti" and manifest.device == "cpu"
    assert set(manifest.chunks) == {16, 1}
    assert set(manifest.files) == {"model.pt2", "weights.safetensors", "tokenizer.model", "generation_config.json"}
    members = zipfile.ZipFile(tiny_aoti / "model.pt2").namelist()
    assert any("/chunk16/" in m for m in members) and any("/chunk1/" in m for m in members)
    assert not [m for m in members if "weights" in m or m.endswith(".bin")]  # no weights in the package
    assert not [p for p in tiny_aoti.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_logits_match_eager_across_ring_wraps(tiny_aoti, tiny_checkpoint):
    from mixtral_export.checkpoint import load_model
    from mixtral_export.runtimes.aoti import AotiBackend
    from mixtral_export.runtimes.eager import EagerBackend

    backend = AotiBackend(tiny_aoti)
    shapes = backend.shapes
    eager = EagerBackend(load_model(tiny_checkpoint, attention_window=shapes.attention_window), shapes)
    (parity,) = lockstep(eager, [backend], decode_steps=DECODE_STEPS)
    assert parity.last_position >= 2 * shapes.cache_slots
    assert parity.max_abs <= TOL, f"step {parity.worst_step}: max |logit diff| {parity.max_abs:.2e} > {TOL}"
    assert parity.top1_agreement == 1.0


@pytest.mark.parametrize("name", ["weights.safetensors", "model.pt2"])
def test_a_modified_file_is_refused(tampered, name):
    from mixtral_export.runtimes.aoti import AotiBackend

    with open(tampered / name, "r+b") as handle:  # same size: only the hash can tell
        handle.seek(os.path.getsize(tampered / name) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ManifestError, match="sha256 does not match"):
        AotiBackend(tampered)


@pytest.mark.parametrize("edit, message", [
    ({"device": "cuda"}, "compiled for 'cuda'"),
    ({"kind": "onnx"}, "not an AOTI one"),
    ({"tools": {"torch": "2.0.0"}}, "built with torch 2.0.0"),
])
def test_a_mismatched_manifest_is_refused(tampered, edit, message):
    from mixtral_export.runtimes.aoti import AotiBackend

    path = tampered / "manifest.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, **edit}))
    with pytest.raises(ManifestError, match=message):
        AotiBackend(tampered)


def test_an_extra_weights_file_is_refused(tampered):
    from mixtral_export.runtimes.aoti import AotiBackend

    shutil.copyfile(tampered / "weights.safetensors", tampered / "other.safetensors")
    with pytest.raises(ManifestError, match="not listed"):
        AotiBackend(tampered)


def test_a_failed_export_leaves_nothing_behind(tiny_checkpoint, tmp_path):
    from mixtral_export.graphs.aoti_export import export_aoti

    def interrupt(stage: str) -> None:
        raise KeyboardInterrupt(stage)

    with pytest.raises(KeyboardInterrupt):
        export_aoti(tiny_checkpoint, tmp_path / "out", progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_serving_does_not_import_the_model_code(tiny_aoti):
    script = (
        "import sys, numpy as np\n"
        "from mixtral_export.runtimes.aoti import AotiBackend\n"
        f"backend = AotiBackend({str(tiny_aoti)!r})\n"
        "ids = np.zeros((2, 1), dtype=np.int64)\n"
        "backend.step(ids, np.array([[0], [" + str(NO_POSITION) + "]]))\n"
        "leaked = [m for m in ('mixtral_export.model', 'mixtral_export.checkpoint') if m in sys.modules]\n"
        "assert not leaked, leaked\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 vector ISAs only")
def test_a_package_for_a_wider_cpu_is_refused(tiny_aoti, monkeypatch):
    import torch._inductor.cpu_vec_isa as isa

    from mixtral_export.runtimes.aoti import AotiBackend

    monkeypatch.setattr(isa, "x86_isa_checker", lambda: [])  # a CPU with no AVX at all
    with pytest.raises(ManifestError, match="this CPU lacks"):
        AotiBackend(tiny_aoti, verify_files=False)


@pytest.mark.slow  # three AOTInductor compiles (T = 16, 4, 1)
def test_a_list_of_prefill_chunks_packages_one_model_each_and_matches_eager(tiny_checkpoint, tmp_path):
    import numpy as np

    from mixtral_export.graphs.aoti_export import export_aoti
    from mixtral_export.checkpoint import load_model
    from mixtral_export.runtimes.aoti import AotiBackend
    from mixtral_export.runtimes.eager import EagerBackend

    artifact = export_aoti(tiny_checkpoint, tmp_path / "p4+16", batch=2, prefill_chunk=(4, 16), cache_slots=32)
    assert load_manifest(artifact).chunks == (16, 4, 1)
    members = zipfile.ZipFile(artifact / "model.pt2").namelist()
    assert all(any(f"/chunk{t}/" in m for m in members) for t in (16, 4, 1))
    backend = AotiBackend(artifact)
    eager = EagerBackend(load_model(tiny_checkpoint, attention_window=backend.shapes.attention_window), backend.shapes)
    ids = np.random.default_rng(0).integers(3, backend.shapes.vocab_size, size=(2, 9))  # (B, 9)
    for t0, t in ((0, 4), (4, 4), (8, 1)):  # T = 4, 4, then 1
        step_ids, positions = ids[:, t0:t0 + t], np.tile(np.arange(t0, t0 + t), (2, 1))
        assert np.abs(eager.step(step_ids, positions) - backend.step(step_ids, positions)).max() <= TOL
