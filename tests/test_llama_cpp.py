"""The bench's llama.cpp runtime: settings refused in one line, a clear line without llama-cpp-python, and
(where llama-cpp-python and llama.cpp's converter are installed; skipped elsewhere, never in CI) its f32
GGUF of the tiny model generating our tokens with our logits, and the bench timing it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mixtral_export.bench.gguf import CONVERTER_ENV, GgufError, build_gguf, import_llama_cpp, quantizer_source
from mixtral_export.bench.models import BenchError
from mixtral_export.bench.run import BenchOptions, run_bench

REPO = Path(__file__).resolve().parents[1]


def llama_cpp_here() -> bool:
    try:
        import_llama_cpp()
    except GgufError:
        return False
    return bool(os.environ.get(CONVERTER_ENV)) and Path(os.environ[CONVERTER_ENV]).is_file()


needs_llama_cpp = pytest.mark.skipif(not llama_cpp_here(),
                                     reason=f"needs llama-cpp-python and ${CONVERTER_ENV} (llama.cpp's converter)")


@pytest.mark.parametrize("runtimes, gguf, named", [(("llama.cpp",), ("q5_9",), "q5_9"),
                                                   (("eager",), ("q8_0",), "add it to --runtimes")])
def test_bad_gguf_settings_are_one_line(tmp_path, runtimes, gguf, named):
    with pytest.raises(BenchError, match=named) as caught:
        run_bench(BenchOptions(model="tiny", runtimes=runtimes, gguf=gguf, work_dir=tmp_path))
    assert "\n" not in str(caught.value)
    assert not any(tmp_path.iterdir())  # refused before anything is built


def test_without_llama_cpp_python_the_error_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    with pytest.raises(GgufError, match=r"pip install 'mixtral-export\[llama\]'"):
        import_llama_cpp()


def test_converting_without_the_converter_names_the_variable_and_leaves_nothing(tmp_path, tiny_checkpoint,
                                                                                monkeypatch):
    monkeypatch.delenv(CONVERTER_ENV, raising=False)
    with pytest.raises(GgufError, match=CONVERTER_ENV):
        build_gguf(tiny_checkpoint, tmp_path / "out", "f32")
    assert not any((tmp_path / "out").iterdir())
    with pytest.raises(GgufError, match="q5_9"):
        build_gguf(tiny_checkpoint, tmp_path / "out", "q5_9")


def test_the_quantizer_source_is_bf16_only_for_a_checkpoint_stored_bf16(tmp_path, tiny_checkpoint):
    """A bf16 GGUF is a lossless source only when the checkpoint holds nothing wider."""
    import torch

    from mixtral_export.tiny import TINY_CONFIG, random_weights, write_checkpoint

    assert quantizer_source(tiny_checkpoint) == "f32"
    config = TINY_CONFIG.replace(dtype="bfloat16")
    bf16 = write_checkpoint(tmp_path / "bf16", config, random_weights(config, dtype=torch.bfloat16))
    assert quantizer_source(bf16) == "bf16"


@pytest.fixture(scope="module")
def windowless(tmp_path_factory) -> Path:
    """The tiny model without its sliding window: llama.cpp runs Mixtral as a llama model, with none."""
    from mixtral_export.tiny import TINY_CONFIG, write_tiny

    return write_tiny(tmp_path_factory.mktemp("llama") / "tiny-nowindow", config=TINY_CONFIG.replace(sliding_window=None))


@needs_llama_cpp
def test_llama_cpp_f32_generates_our_tokens_with_our_logits(windowless, tmp_path):
    from mixtral_export.bench.llama_runner import LlamaCpp
    from mixtral_export.artifact.contract import StepShapes
    from mixtral_export.checkpoint import load_model
    from mixtral_export.artifact.config import MixtralConfig
    from mixtral_export.runtimes.eager import EagerBackend
    from mixtral_export.runtimes.verify import greedy, quantization_cost, teacher_forced

    config = MixtralConfig.from_json(windowless / "config.json")
    shapes = StepShapes.for_config(config, batch=1, prefill_chunk=8, cache_slots=64)
    eager = EagerBackend(load_model(windowless, attention_window=shapes.attention_window), shapes)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, config.vocab_size, size=n).tolist() for n in (5, 19)]
    ours = greedy(eager, prompts, 24)
    our_logits = teacher_forced(eager, prompts, ours)

    f32 = LlamaCpp(build_gguf(windowless, tmp_path, "f32"), threads=2, n_ctx=64)
    assert f32.greedy(prompts, 24) == ours
    theirs = f32.teacher_forced(prompts, ours)
    assert max(float(np.abs(a - b).max()) for a, b in zip(theirs, our_logits)) <= 1e-4  # measured 4.5e-6
    f32.close()
    q8 = LlamaCpp(build_gguf(windowless, tmp_path, "q8_0", threads=2), threads=2, n_ctx=64)
    cost = quantization_cost("q8_0", "f32", q8.teacher_forced(prompts, ours), theirs, [])
    q8.close()
    assert cost.top1_agreement >= 0.9 and 0 < cost.kl_mean < 0.05  # q8_0 is close but not the same weights
    assert (tmp_path / "gguf-q8_0.gguf").stat().st_size < 0.4 * (tmp_path / "gguf-f32.gguf").stat().st_size


@pytest.mark.slow  # ~25 s
@needs_llama_cpp
def test_bench_times_llama_cpp_per_gguf_type(windowless, tmp_path):
    report = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "mixtral_export", "bench", str(windowless), "--work-dir",
                          str(tmp_path / "work"), "--runtimes", "ort-gather,llama.cpp", "--gguf", "f32,q8_0",
                          "--contexts", "8,40", "--decode-steps", "3", "--repeats", "1", "--json", str(report)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    runs = json.loads(report.read_text())["runs"]
    assert [r["label"] for r in runs] == ["ort-gather", "llama.cpp f32", "llama.cpp q8_0"]
    assert runs[0]["cache_slots"] == 64  # our ring at llama.cpp's capacity: 40 + 3 + 1 positions, to a power of 2
    f32, q8 = runs[1], runs[2]
    for record in (f32, q8):
        assert "error" not in record, record.get("error")
        assert [p["context"] for p in record["contexts"]] == [8, 40]
        assert all(p["decode_tokens_per_s"]["median"] > 0 and p["fraction_of_bound"] > 0 for p in record["contexts"])
    assert q8["decode_weight_bytes"] < 0.4 * f32["decode_weight_bytes"]
    assert q8["artifact_bytes"] < 0.4 * f32["artifact_bytes"]
