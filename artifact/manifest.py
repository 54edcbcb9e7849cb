"""manifest.json: what an artifact folder holds, what it was built from, and proof it is intact.

An artifact is a folder of graph files plus this manifest, written last by the builder. The
manifest records the model config, the static step shapes, the chunk lengths the graph serves,
the I/O contract per chunk length, the tools that built it, and the size and hash of every
file beside it (`FileEntry`: sha256_blocks, graphs/block_hash.py; a plain sha256 in format
2), so a runtime can refuse an artifact that was truncated, tampered with, mixed
with another build's files or built for another model, before it loads gigabytes of weights.

A head artifact (a non-generative head's one static graph) records its `head` and `labels` too and
loads as a `HeadManifest`; a step artifact loads as a `Manifest`.

Torch-free and onnx-free: runtimes read it with numpy and onnxruntime alone.
"""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path, PurePosixPath

from mixtral_export.artifact.block_hash import BLOCK_BYTES, hash_file
from mixtral_export.artifact.contract import CLASSIFIER_KINDS, ContractError, HeadShapes, StepShapes
from mixtral_export.artifact.config import ConfigError, MixtralConfig
from mixtral_export.errors import UserError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 3  # 2: one cache input per layer (graphs/contract.py); 3: files hashed as sha256_blocks
OLDEST_READ = 2  # format 2 (files with a plain sha256) still loads and verifies: no re-export
KINDS = ("onnx", "aoti")
# Files that hold graphs or weights: one of these that the manifest does not list means the
# folder mixes builds, so it is refused rather than guessed at.
GRAPH_SUFFIXES = (".onnx", ".data", ".pt2", ".safetensors")
TOOLS = ("torch", "onnx", "onnxscript", "onnxruntime", "mixtral-export")
HASH_CHUNK = 16 << 20  # bytes read at a time: artifacts hold tens of GB
# The build's dtype is a choice of the artifact (manifest.dtype), not part of the model's identity.
IDENTITY_IGNORES = ("dtype",)
# What every `engines` record holds (graphs/trt_engine.py writes them, runtimes/trt.py checks them).
ENGINE_FIELDS = ("tensorrt", "gpu", "compute_capability", "precision", "profiles")


class ManifestError(UserError, ValueError):
    """A missing, malformed, tampered or mismatched artifact; one line naming the file."""


@dataclass(frozen=True)
class FileEntry:
    """A file's size and hash: the sha256_blocks root of blocks of `block_size` bytes
    (graphs/block_hash.py), or with block_size None the whole file's sha256 (format 2 manifests).

    In manifest.json: {"size": N, "sha256_blocks": {"block_size": B, "root": HEX}} or
    {"size": N, "sha256": HEX}; `from_json` is the one place an entry is checked."""
    size: int
    digest: str  # 64 hex digits
    block_size: int | None

    @classmethod
    def from_json(cls, raw, where: str) -> FileEntry:
        if not isinstance(raw, dict) or not isinstance(raw.get("size"), int) or raw["size"] < 0:
            raise ManifestError(f"{where}: a file entry needs a size in bytes")
        blocks = raw.get("sha256_blocks")
        if ("sha256" in raw) == (blocks is not None):
            raise ManifestError(f"{where}: a file entry needs exactly one of sha256, sha256_blocks")
        if blocks is None:
            entry = cls(raw["size"], raw["sha256"], None)
        elif isinstance(blocks, dict) and isinstance(blocks.get("block_size"), int) and blocks["block_size"] > 0:
            entry = cls(raw["size"], blocks.get("root"), blocks["block_size"])
        else:
            raise ManifestError(f"{where}: sha256_blocks needs a positive block_size and a root")
        if not isinstance(entry.digest, str) or len(entry.digest) != 64 or \
                entry.digest.strip("0123456789abcdef"):
            raise ManifestError(f"{where}: the hash must be 64 lowercase hex digits")
        return entry

    def to_json(self) -> dict:
        if self.block_size is None:
            return {"size": self.size, "sha256": self.digest}
        return {"size": self.size, "sha256_blocks": {"block_size": self.block_size, "root": self.digest}}

    def matches(self, path: Path) -> bool:
        """Whether `path` hashes to this entry, by the entry's own scheme."""
        if self.block_size is None:
            return sha256_file(path) == self.digest
        return hash_file(path, self.block_size) == self.digest

    def label(self) -> str:
        """The scheme and the first digits, as the CLI shows them."""
        scheme = "sha256" if self.block_size is None else f"sha256_blocks/{self.block_size >> 20}M"
        return f"{scheme} {self.digest[:16]}..."


@dataclass(frozen=True, kw_only=True)
class ArtifactManifest:
    """What every artifact's manifest records; `load_manifest` returns one of the two kinds below."""
    folder: Path
    format_version: int
    kind: str
    config: MixtralConfig
    chunks: tuple[int, ...]  # the chunk lengths T the graphs serve: (P, 1), or a head graph's (T,)
    graphs: dict[str, str]  # role -> file name, e.g. {"step": "model.onnx"}
    io: dict  # {"inputs"|"outputs": [{"name", "dtype", "shapes": {str(T): [dims]}}]}
    dtype: str
    opset: int | None
    tools: dict[str, str]
    created: str
    tokenizer: str | None  # file name inside the folder, or None when none was copied
    bos_token_id: int | None
    eos_token_id: tuple[int, ...]
    files: dict[str, FileEntry]
    device: str | None = None  # what the graphs were compiled for ("cpu", "cuda"); None = any (ONNX)
    source: str | None = None  # the checkpoint folder it was built from, as the builder saw it
    routing: str = "dense"  # how the MoE blocks compute: "dense" | "gather" (mixtral_export/model.py)
    engines: dict[str, dict] = field(default_factory=dict)  # engine file -> its build record (TensorRT)

    def path(self, name: str) -> Path:
        return self.folder / name

    def graph_path(self, role: str = "step") -> Path:
        if role not in self.graphs:
            raise ManifestError(f"{self.folder / MANIFEST_NAME}: no {role!r} graph (has {', '.join(self.graphs)})")
        return self.folder / self.graphs[role]


@dataclass(frozen=True, kw_only=True)
class Manifest(ArtifactManifest):
    """A causal LM's step artifact: the prefill/decode graph and its cache (graphs/contract.py)."""
    shapes: StepShapes
    # Weight-only quantization (graphs/onnx_quant.py): scheme, bits, symmetric, block_size,
    # activations and per tensor {kind, max_abs, mean_abs}; None = float weights.
    quantization: dict | None = None


@dataclass(frozen=True, kw_only=True)
class HeadManifest(ArtifactManifest):
    """A head artifact (graphs/onnx_heads.py): one static (B, T) graph of a non-generative head."""
    shapes: HeadShapes
    labels: tuple[str, ...] = ()  # a classification head's label names by class id (config.json's id2label)

    @property
    def head(self) -> str:
        """What the graph computes: one of contract.HEAD_KINDS."""
        return self.shapes.head


def io_contract(shapes: StepShapes, chunks: tuple[int, ...]) -> dict:
    """The step contract's names, dtypes and shapes for every served chunk length."""
    def entries(names, shapes_of, dtype_of) -> list[dict]:
        return [{"name": name, "dtype": dtype_of(name),
                 "shapes": {str(t): list(shapes_of(t)[name]) for t in chunks}} for name in names]

    return {"inputs": entries(shapes.input_names, shapes.input_shapes, shapes.input_dtype),
            "outputs": entries(shapes.output_names, shapes.output_shapes, shapes.output_dtype)}


def artifact_io(shapes: StepShapes | HeadShapes, chunks: tuple[int, ...]) -> dict:
    """The I/O the manifest records: a head graph's static contract, or the step's per chunk length."""
    return shapes.io() if isinstance(shapes, HeadShapes) else io_contract(shapes, chunks)


def tool_versions() -> dict[str, str]:
    """Installed versions of the build tools (read from package metadata; nothing is imported)."""
    out = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def sha256_file(path: Path) -> str:
    """The whole file's sha256, sequential: only format 2 manifests' entries are checked with it."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def write_manifest(folder: str | Path, *, kind: str, config: MixtralConfig, shapes: StepShapes | HeadShapes,
                   graphs: dict[str, str], opset: int | None = None,
                   tokenizer: str | None = None, bos_token_id: int | None = None,
                   eos_token_id: tuple[int, ...] | None = None, device: str | None = None,
                   source: str | Path | None = None, routing: str = "dense", labels: tuple[str, ...] = (),
                   hashed: dict[str, FileEntry] | None = None, quantization: dict | None = None) -> Path:
    """Hash every file in `folder` and write manifest.json beside them; call it last.

    bos/eos default to the config's; the chunk lengths are shapes.chunks (a head graph's: its T).
    `hashed` gives the entries of files the builder hashed as it wrote them (tens of GB need not be
    read twice); their sizes are still checked against the disk.
    """
    folder = Path(folder)
    if kind not in KINDS:
        raise ManifestError(f"{folder / MANIFEST_NAME}: unknown artifact kind {kind!r} (one of {', '.join(KINDS)})")
    chunks = shapes.chunks
    names = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST_NAME)
    for name in names:
        if not (folder / name).is_file():
            raise ManifestError(f"{folder / name}: an artifact holds plain files only")
    for role, name in graphs.items():
        if name not in names:
            raise ManifestError(f"{folder / name}: the {role} graph is not in the artifact")
    if tokenizer is not None and tokenizer not in names:
        raise ManifestError(f"{folder / tokenizer}: the tokenizer is not in the artifact")
    raw = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tools": tool_versions(),
        "dtype": shapes.dtype,
        "opset": opset,
        "config": config.to_dict(),
        "shapes": shapes.to_dict(),
        "chunks": list(chunks),
        "graphs": dict(graphs),
        "io": artifact_io(shapes, chunks),
        "tokenizer": tokenizer,
        "bos_token_id": config.bos_token_id if bos_token_id is None else bos_token_id,
        "eos_token_id": list(config.eos_token_id if eos_token_id is None else eos_token_id),
        "device": device,
        "source": None if source is None else str(source),
        "routing": routing,
        **({"head": shapes.head, "labels": list(labels)} if isinstance(shapes, HeadShapes) else {}),
        **({"quantization": quantization} if quantization else {}),
        "files": {name: file_entry(folder / name, (hashed or {}).get(name)) for name in names},
    }
    path = folder / MANIFEST_NAME
    tmp = folder / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(raw, indent=2) + "\n")
    tmp.replace(path)
    return path


def file_entry(path: Path, hashed: FileEntry | None = None) -> dict:
    """The manifest's entry of `path`: hashed now, or as the builder hashed it while writing."""
    size = path.stat().st_size
    if hashed is None:
        return FileEntry(size, hash_file(path, BLOCK_BYTES), BLOCK_BYTES).to_json()
    if hashed.size != size:
        raise ManifestError(f"{path}: {size} bytes on disk, {hashed.size} hashed while writing")
    return hashed.to_json()


def load_manifest(folder: str | Path, verify_files: bool = True) -> Manifest | HeadManifest:
    """Read and check an artifact's manifest: a step artifact's `Manifest` or a head artifact's
    `HeadManifest`, so a caller that serves both dispatches once on the class.

    Always checks that every listed file exists with its recorded size and that no unlisted
    graph or weight file sits beside them (cheap: one stat per file). `verify_files` also
    re-hashes every file (minutes for a 90 GB model), which catches same-size tampering.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ManifestError(f"{folder}: not an artifact folder")
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: missing; {folder} is not a built artifact "
                            f"(or its build did not finish)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: expected a JSON object")
    version = raw.get("format_version")
    if isinstance(version, int) and 0 < version < OLDEST_READ:
        raise ManifestError(f"{path}: format_version {version} was written by an older mixtral-export "
                            f"(this version reads {OLDEST_READ} to {FORMAT_VERSION}); export the artifact again")
    if not isinstance(version, int) or not OLDEST_READ <= version <= FORMAT_VERSION:
        raise ManifestError(f"{path}: unknown format_version {version!r} "
                            f"(this version reads {OLDEST_READ} to {FORMAT_VERSION})")
    manifest = _parse(raw, folder, path)
    _check_files(manifest, verify_files)
    return manifest


def check_compatible(manifest: ArtifactManifest, config: MixtralConfig) -> None:
    """Refuse an artifact built for another model: name every field that differs (dtype aside)."""
    differing = [f.name for f in fields(MixtralConfig)
                 if f.name not in IDENTITY_IGNORES and getattr(manifest.config, f.name) != getattr(config, f.name)]
    if differing:
        detail = ", ".join(f"{name} {getattr(manifest.config, name)!r} != {getattr(config, name)!r}"
                           for name in differing)
        raise ManifestError(f"{manifest.folder / MANIFEST_NAME}: built for another config ({detail})")


def _parse(raw: dict, folder: Path, path: Path) -> Manifest | HeadManifest:
    """The manifest as its kind: a recorded `head` makes a HeadManifest, its absence a step Manifest."""
    try:
        config = MixtralConfig.from_dict(raw["config"], source=f"{path}: config")
        files = {name: FileEntry.from_json(entry, f"{path}: files[{name!r}]")
                 for name, entry in raw["files"].items()}
        eos = raw["eos_token_id"]
        common = dict(
            folder=folder, format_version=raw["format_version"], kind=raw["kind"], config=config,
            chunks=tuple(int(t) for t in raw["chunks"]), graphs=dict(raw["graphs"]),
            io=raw["io"], dtype=raw["dtype"], opset=raw["opset"], tools=dict(raw["tools"]),
            created=raw["created"], tokenizer=raw["tokenizer"], bos_token_id=raw["bos_token_id"],
            eos_token_id=tuple(eos) if isinstance(eos, list) else (eos,), files=files,
            device=raw.get("device"), source=raw.get("source"), engines=dict(raw.get("engines") or {}),
            routing=raw.get("routing", "dense"))
        if "head" in raw:
            manifest = HeadManifest(**common, shapes=HeadShapes.from_dict(raw["shapes"]),
                                    labels=tuple(str(x) for x in raw.get("labels", ())))
        else:
            manifest = Manifest(**common, shapes=StepShapes.from_dict(raw["shapes"]),
                                quantization=raw.get("quantization"))
    except ManifestError:
        raise
    except ConfigError as err:
        raise ManifestError(str(err)) from None
    except KeyError as err:
        raise ManifestError(f"{path}: field {err.args[0]!r} is missing") from None
    except (ContractError, TypeError, ValueError, AttributeError) as err:
        raise ManifestError(f"{path}: malformed ({err})") from None
    shapes = manifest.shapes
    if manifest.kind not in KINDS:
        raise ManifestError(f"{path}: unknown artifact kind {manifest.kind!r} (one of {', '.join(KINDS)})")
    if manifest.dtype != shapes.dtype:
        raise ManifestError(f"{path}: dtype {manifest.dtype!r} differs from shapes.dtype {shapes.dtype!r}")
    if isinstance(manifest, HeadManifest):
        _check_head(manifest, raw["head"], path)
    else:
        expected = {"num_layers": config.num_hidden_layers, "num_kv_heads": config.num_key_value_heads,
                    "head_dim": config.head_dim, "vocab_size": config.vocab_size}
        for name, value in expected.items():
            if getattr(shapes, name) != value:
                raise ManifestError(f"{path}: shapes.{name} ({getattr(shapes, name)}) does not match the config ({value})")
        if manifest.chunks != shapes.chunks:
            raise ManifestError(f"{path}: chunks {list(manifest.chunks)} must be {list(shapes.chunks)} "
                                f"(the prefill chunk, then 1)")
        if manifest.io != io_contract(shapes, manifest.chunks):
            raise ManifestError(f"{path}: io does not match the step contract for these shapes")
    for name in files:
        pure = PurePosixPath(name)
        if pure.is_absolute() or len(pure.parts) != 1 or name in ("", ".", ".."):
            raise ManifestError(f"{path}: file {name!r} is not a plain name inside the artifact")
    for role, name in manifest.graphs.items():
        if name not in files:
            raise ManifestError(f"{path}: the {role} graph {name!r} is not listed under files")
    if manifest.tokenizer is not None and manifest.tokenizer not in files:
        raise ManifestError(f"{path}: the tokenizer {manifest.tokenizer!r} is not listed under files")
    for name, record in manifest.engines.items():
        if name not in files:
            raise ManifestError(f"{path}: the engine {name!r} is not listed under files")
        missing = [key for key in ENGINE_FIELDS if not isinstance(record, dict) or key not in record]
        if missing:
            raise ManifestError(f"{path}: the engine record of {name!r} lacks {', '.join(missing)}")
    return manifest


def _check_head(manifest: HeadManifest, head: str, path: Path) -> None:
    """A head artifact's shapes agree with its recorded head, config, labels and I/O."""
    shapes = manifest.shapes
    if shapes.head != head:
        raise ManifestError(f"{path}: head {head!r} differs from shapes.head {shapes.head!r}")
    if shapes.hidden_size != manifest.config.hidden_size:
        raise ManifestError(f"{path}: shapes.hidden_size ({shapes.hidden_size}) does not match the config "
                            f"({manifest.config.hidden_size})")
    classifies = shapes.head in CLASSIFIER_KINDS
    if len(manifest.labels) != (shapes.num_labels if classifies else 0):
        raise ManifestError(f"{path}: {len(manifest.labels)} labels for a {shapes.head} head with "
                            f"num_labels {shapes.num_labels}")
    if manifest.chunks != (shapes.seq_len,):
        raise ManifestError(f"{path}: chunks {list(manifest.chunks)} must be [{shapes.seq_len}] (the head's T)")
    if manifest.io != shapes.io():
        raise ManifestError(f"{path}: io does not match the head contract for these shapes")


def set_engine(folder: str | Path, name: str, record: dict | None) -> Path:
    """List the engine file `name` (hashed now) with its build record, or drop it with record=None.

    Rewrites manifest.json atomically and hashes only that one file, so adding an engine to a
    90 GB artifact does not re-hash its weights.
    """
    folder = Path(folder)
    load_manifest(folder, verify_files=False)  # a valid artifact to begin with
    path = folder / MANIFEST_NAME
    raw = json.loads(path.read_text())
    engines = raw.setdefault("engines", {})
    if record is None:
        if engines.pop(name, None) is not None:
            raw["files"].pop(name, None)
    else:
        missing = [key for key in ENGINE_FIELDS if key not in record]
        if missing:
            raise ManifestError(f"{folder / name}: an engine record needs {', '.join(missing)}")
        engines[name] = dict(record)
        raw["files"][name] = file_entry(folder / name)
        raw["format_version"] = FORMAT_VERSION  # a format 2 manifest now holds a sha256_blocks entry
    tmp = folder / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(raw, indent=2) + "\n")
    tmp.replace(path)
    return path


def _check_files(manifest: ArtifactManifest, verify_hashes: bool) -> None:
    for name, entry in manifest.files.items():
        file = manifest.folder / name
        if not file.is_file():
            raise ManifestError(f"{file}: listed in {MANIFEST_NAME} but missing")
        size = file.stat().st_size
        if size != entry.size:
            raise ManifestError(f"{file}: size {size} bytes, {MANIFEST_NAME} says {entry.size} "
                                f"(truncated or replaced)")
    for file in sorted(manifest.folder.iterdir()):
        if file.suffix in GRAPH_SUFFIXES and file.name not in manifest.files:
            raise ManifestError(f"{file}: not listed in {MANIFEST_NAME} (a file from another build?)")
    if verify_hashes:
        for name, entry in manifest.files.items():
            if not entry.matches(manifest.folder / name):
                raise ManifestError(f"{manifest.folder / name}: sha256 does not match {MANIFEST_NAME} (modified)")
