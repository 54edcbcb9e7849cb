"""sha256_blocks (artifact/block_hash.py): the definition, computed independently here; the shell
check docs/design.md gives; blocks hashed behind an export's writes; manifests written the old way (plain sha256)."""
from __future__ import annotations

import functools
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from mixtral_export.artifact import block_hash
from mixtral_export.artifact.block_hash import BlockHasher, hash_file
from mixtral_export.artifact.manifest import FORMAT_VERSION, MANIFEST_NAME, ManifestError, load_manifest, set_engine, sha256_file


def definition(data: bytes, block_size: int) -> str:
    """docs/design.md's definition, spelled out: sha256 over the blocks' 32-byte sha256 digests."""
    blocks = [data[at:at + block_size] for at in range(0, len(data), block_size)]
    return hashlib.sha256(b"".join(hashlib.sha256(block).digest() for block in blocks)).hexdigest()


@pytest.mark.parametrize("length", [0, 1, 4095, 4096, 4097, 3 * 4096, 50_000])
def test_root_is_the_definition(tmp_path, length):
    data = bytes((i * 7 + length) % 251 for i in range(length))
    path = tmp_path / "file"
    path.write_bytes(data)
    assert hash_file(path, 4096) == definition(data, 4096)
    if length == 0:
        assert hash_file(path, 4096) == hashlib.sha256(b"").hexdigest()


def test_one_block_differs_from_the_plain_sha256(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"x" * 1000)
    assert hash_file(path) == hashlib.sha256(hashlib.sha256(b"x" * 1000).digest()).hexdigest() != sha256_file(path)


def test_blocks_hashed_behind_writes_on_a_small_pool(tmp_path):
    """The writer reports progress in odd steps; more blocks wait than the lag allows."""
    data = bytes(range(256)) * 200  # 51,200 bytes: 50 blocks of 1 kB and a short one
    with open(tmp_path / "file", "w+b", buffering=0) as handle, \
            BlockHasher(handle.fileno(), block_size=1024, threads=2) as hasher:
        for at in range(0, len(data), 777):
            handle.write(data[at:at + 777])
            hasher.written(min(at + 777, len(data)))
        assert hasher.root(len(data)) == definition(data, 1024)


@pytest.mark.skipif(not (shutil.which("split") and shutil.which("xxd") and shutil.which("sha256sum")),
                    reason="split, xxd or sha256sum missing")
def test_design_doc_shell_check_gives_the_root(tmp_path):
    """The one-liner docs/design.md gives, as written there, on blocks of 1M instead of 64M."""
    design = (Path(__file__).resolve().parent.parent / "docs" / "design.md").read_text(encoding="utf-8")
    documented = [line for line in design.splitlines() if line.startswith("split -b 64M ")]
    assert len(documented) == 1, "docs/design.md should give the split/xxd check on one line"
    assert documented[0].endswith(" model.onnx.data | sha256sum") and block_hash.BLOCK_BYTES == 64 << 20
    data = bytes((i * 13) % 256 for i in range(3 * 1024 * 1024 + 5))
    path = tmp_path / "file"
    path.write_bytes(data)
    command = documented[0].replace("-b 64M", "-b 1M").replace("model.onnx.data", str(path)) + " | cut -c1-64"
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=True).stdout.strip()
    assert out == hash_file(path, 1 << 20) == definition(data, 1 << 20)


def test_export_hashes_many_blocks_as_it_writes(tiny_checkpoint, tmp_path, monkeypatch):
    """Blocks of 4 kB: the tiny data file spans many, more than the hasher lets wait. The recorded
    root is the definition's, verify agrees, and the bytes are those of onnx_ir's own save."""
    from mixtral_export.graphs import weights_file
    from mixtral_export.graphs.onnx_export import DATA_NAME, export_onnx
    from tests.test_placeholder_export import SHAPES, reference_artifact

    monkeypatch.setattr(weights_file, "BlockHasher", functools.partial(BlockHasher, block_size=4096, threads=2))
    ours = export_onnx(tiny_checkpoint, tmp_path / "ours", dtype="float32", routing="gather", **SHAPES)
    data = (ours / DATA_NAME).read_bytes()
    assert len(data) > 3 * block_hash.LAG_BLOCKS * 2 * 4096
    entry = load_manifest(ours).files[DATA_NAME]  # verifies every file by its own block size
    assert (entry.size, entry.block_size, entry.digest) == (len(data), 4096, definition(data, 4096))
    theirs = reference_artifact(tiny_checkpoint, tmp_path / "theirs", "float32", "gather")
    assert hashlib.sha256(data).hexdigest() == sha256_file(theirs / DATA_NAME)


def old_way(folder):
    """Rewrite the manifest as format 2 wrote it: a plain sha256 per file."""
    path = folder / MANIFEST_NAME
    raw = json.loads(path.read_text())
    raw["format_version"] = 2
    raw["files"] = {name: {"size": entry["size"], "sha256": sha256_file(folder / name)}
                    for name, entry in raw["files"].items()}
    path.write_text(json.dumps(raw))


def test_a_manifest_written_the_old_way_loads_and_verifies(tmp_path):
    from tests.test_manifest import CONFIG, SHAPES
    from mixtral_export.artifact.manifest import write_manifest

    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"graph" * 100)
    (folder / "model.onnx.data").write_bytes(bytes(range(256)) * 64)
    write_manifest(folder, kind="onnx", config=CONFIG, shapes=SHAPES, graphs={"step": "model.onnx"}, opset=18)
    assert load_manifest(folder).files["model.onnx"].block_size == block_hash.BLOCK_BYTES
    old_way(folder)
    manifest = load_manifest(folder)
    assert manifest.format_version == 2
    assert manifest.files["model.onnx.data"].block_size is None
    assert manifest.files["model.onnx.data"].digest == hashlib.sha256(bytes(range(256)) * 64).hexdigest()
    raw = bytearray((folder / "model.onnx.data").read_bytes())
    raw[10] ^= 1
    (folder / "model.onnx.data").write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match="model.onnx.data: sha256 does not match"):
        load_manifest(folder)
    raw[10] ^= 1
    (folder / "model.onnx.data").write_bytes(bytes(raw))
    (folder / "engine.plan").write_bytes(b"engine")
    set_engine(folder, "engine.plan", {"tensorrt": "10", "gpu": "x", "compute_capability": "9.0",
                                       "precision": "bf16", "profiles": []})
    manifest = load_manifest(folder)  # old entries kept, the new one in blocks: now format 3
    assert manifest.format_version == FORMAT_VERSION
    assert manifest.files["model.onnx"].block_size is None
    assert manifest.files["engine.plan"].block_size == block_hash.BLOCK_BYTES


@pytest.mark.parametrize("entry, complaint", [
    ({"size": 1}, "exactly one of"),
    ({"size": 1, "sha256": "0" * 64, "sha256_blocks": {"block_size": 1, "root": "0" * 64}}, "exactly one of"),
    ({"size": 1, "sha256_blocks": {"block_size": 0, "root": "0" * 64}}, "positive block_size"),
    ({"size": 1, "sha256_blocks": {"block_size": 64, "root": "XYZ"}}, "64 lowercase hex"),
    ({"sha256": "0" * 64}, "size"),
])
def test_malformed_entries_are_one_line(tmp_path, entry, complaint):
    from tests.test_manifest import CONFIG, SHAPES
    from mixtral_export.artifact.manifest import write_manifest

    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"graph")
    write_manifest(folder, kind="onnx", config=CONFIG, shapes=SHAPES, graphs={"step": "model.onnx"}, opset=18)
    raw = json.loads((folder / MANIFEST_NAME).read_text())
    raw["files"]["model.onnx"] = entry
    (folder / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(ManifestError) as info:
        load_manifest(folder)
    assert complaint in str(info.value) and "model.onnx" in str(info.value) and "\n" not in str(info.value)
