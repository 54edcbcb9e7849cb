"""llama.cpp's GGUF files of a checkpoint, made with llama.cpp's own tools, cached per checkpoint and type.

    python3 -m bench.gguf CHECKPOINT FOLDER TYPE [--converter PATH] [--threads N]    (from the repo root)

`f32` and `bf16` come from llama.cpp's converter, `convert_hf_to_gguf.py --outtype f32|bf16` (found
through --converter or $MIXTRAL_EXPORT_LLAMA_CONVERTER; it ships in llama-cpp-python's sdist under
vendor/llama.cpp/ with the gguf-py it imports); q8_0, q4_0 and q4_k_m from llama.cpp's quantizer
(`llama_model_quantize`, which llama-cpp-python exposes) applied to one of those, as `llama-quantize`
does: the bf16 file when every float tensor of the checkpoint is stored bf16 (then it is lossless
and half the f32 file), else the f32 one. Each file is written under a temporary name and
renamed, with a sidecar (FILE.json) naming the checkpoint it came from (path, and each file's size and mtime): a later
run reuses it while that still matches. Needs the `llama` extra (llama-cpp-python, gguf).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from mixtral_export.bench.models import BenchError

TYPES = {"f32": 0, "bf16": 32, "q8_0": 7, "q4_0": 2, "q4_k_m": 15}  # llama_ftype of each GGUF type
CONVERTED = ("f32", "bf16")  # what the converter writes; the others are quantized from one of them
CONVERTER_ENV = "MIXTRAL_EXPORT_LLAMA_CONVERTER"


class GgufError(BenchError):
    """A GGUF file that cannot be made or read here; one line."""


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise GgufError("the llama.cpp runtime needs llama-cpp-python: pip install 'mixtral-export[llama]' "
                        "(it builds llama.cpp from source)") from None
    return llama_cpp


def gguf_path(folder: Path, kind: str) -> Path:
    return folder / f"gguf-{kind}.gguf"


def fingerprint(checkpoint: Path) -> dict:
    """What a GGUF file was made from: the checkpoint folder and its files' sizes and mtimes."""
    files = sorted(p for p in checkpoint.iterdir() if p.name.endswith((".safetensors", ".json", ".model")))
    return {"source": str(checkpoint.resolve()),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def is_current(path: Path, checkpoint: Path, kind: str) -> bool:
    try:
        recorded = json.loads(Path(f"{path}.json").read_text())
    except (OSError, ValueError):
        return False
    return path.is_file() and recorded == {**fingerprint(checkpoint), "type": kind}


def build_gguf(checkpoint: Path, folder: Path, kind: str, converter: Path | None = None, threads: int | None = None,
               say: Callable[[str], None] = lambda line: None) -> Path:
    """The GGUF file of `checkpoint` at `kind` (f32 | bf16 | q8_0 | q4_0 | q4_k_m): the cached one, or a new one."""
    if kind not in TYPES:
        raise GgufError(f"unknown GGUF type {kind!r} (one of {', '.join(TYPES)})")
    out = gguf_path(folder, kind)
    if is_current(out, checkpoint, kind):
        return out
    folder.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        if kind in CONVERTED:
            convert(checkpoint, tmp, kind, converter, say)
        else:
            source = build_gguf(checkpoint, folder, quantizer_source(checkpoint), converter, threads, say)
            say(f"quantizing {source.name} to {kind} with llama.cpp's quantizer")
            quantize(source, tmp, kind, threads or len(os.sched_getaffinity(0)))
        Path(f"{out}.json").unlink(missing_ok=True)
        os.replace(tmp, out)
        Path(f"{out}.json").write_text(json.dumps({**fingerprint(checkpoint), "type": kind}) + "\n")
    finally:
        tmp.unlink(missing_ok=True)
    return out


def quantizer_source(checkpoint: Path) -> str:
    """bf16 when every float tensor of the checkpoint is stored bf16 (converting it to bf16 loses nothing), else f32."""
    from mixtral_export.safetensors_file import read_header

    dtypes = {e.dtype for p in checkpoint.glob("*.safetensors") for e in read_header(p).values()}
    return "bf16" if dtypes and dtypes <= {"BF16", "I64", "I32", "BOOL"} else "f32"


def convert(checkpoint: Path, out: Path, kind: str, converter: Path | None, say: Callable[[str], None]) -> None:
    script = converter or (Path(os.environ[CONVERTER_ENV]) if os.environ.get(CONVERTER_ENV) else None)
    if script is None or not script.is_file():
        where = f"{script} is not a file" if script else f"set ${CONVERTER_ENV} or pass --llama-converter"
        raise GgufError(f"converting {checkpoint} to GGUF needs llama.cpp's convert_hf_to_gguf.py ({where}; "
                        "it is in llama-cpp-python's sdist under vendor/llama.cpp/)")
    say(f"converting {checkpoint.name} to GGUF {kind} with {script}")
    done = subprocess.run([sys.executable, str(script), str(checkpoint), "--outfile", str(out), "--outtype", kind],
                          capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        lines = [line for line in done.stderr.splitlines() if line.strip()] or [f"exit code {done.returncode}"]
        raise GgufError(f"llama.cpp's converter failed on {checkpoint}: {lines[-1]}")


def quantize(source: Path, out: Path, kind: str, threads: int) -> None:
    llama_cpp = import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread, params.ftype = threads, TYPES[kind]
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise GgufError(f"llama.cpp's quantizer failed on {source} ({kind})")


def decode_weight_bytes(path: Path, vocab_size: int, experts_per_token: int, experts: int) -> int:
    """Bytes of weights a batch-1 decode step reads from this GGUF file: every tensor once, of the
    stacked experts (*_exps) the token's top k, of the embedding one row."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GgufError("reading a GGUF file needs gguf: pip install 'mixtral-export[llama]'") from None
    total = 0.0
    for tensor in GGUFReader(str(path)).tensors:
        share = (experts_per_token / experts if "_exps" in tensor.name
                 else 1 / vocab_size if tensor.name == "token_embd.weight" else 1)
        total += int(tensor.n_bytes) * share
    return int(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("folder", type=Path)
    parser.add_argument("kind", choices=tuple(TYPES))
    parser.add_argument("--converter", type=Path)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    say = lambda line: print(f"bench: {line}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        print(build_gguf(args.checkpoint, args.folder, args.kind, args.converter, args.threads, say))
    except GgufError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
