"""`eval`: perplexity against transformers' own exp(mean NLL), KL against saved and live references, bad input.

Tolerances: perplexity 1e-4 relative against transformers (fp32 graphs agree to ~1e-6 in logits);
fp32 ORT against transformers KL mean < 1e-6 (measured ~2.5e-9 on the tiny model, most of it the
saved reference's uint16 rounding); a saved reference's KL within 1e-4 relative of the KL computed
from the float logits themselves (measured on the tiny int4 model: 3.7e-6 for the mean, 2.4e-5 for
the max).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mixtral_export.runtimes import logit_reference
from mixtral_export.runtimes.load import open_step_backend
from mixtral_export.runtimes.perplexity import EvalOptions, cut_windows, evaluate, window_logits
from mixtral_export.runtimes.logprobs import log_softmax
from mixtral_export.runtimes.verify import kl_divergence

REPO = Path(__file__).resolve().parents[1]
CTX = 25  # odd: ctx - ctx // 2 = 13 tokens scored per window, each window within the tiny model's 32-token window


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixtral_export", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(run: subprocess.CompletedProcess, *words: str) -> None:
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in run.stderr, run.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    """130 random ids, comma- and whitespace-separated: 5 windows of 25, 5 tokens dropped."""
    ids = np.random.default_rng(7).integers(0, 1000, 130)
    path = tmp_path_factory.mktemp("tokens") / "ids.txt"
    path.write_text(",".join(map(str, ids[:60])) + "\n" + " ".join(map(str, ids[60:])) + "\n")
    return path


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    import torch
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32, attn_implementation="eager").eval()


def hf_perplexity(model, windows: np.ndarray) -> float:
    """transformers' exp(mean NLL) of each window's tokens ctx//2..ctx-1, written apart from eval."""
    import torch

    first = windows.shape[1] // 2
    with torch.no_grad():
        nll = [torch.nn.functional.cross_entropy(model(input_ids=torch.tensor(w[None])).logits[0, first - 1:-1],
                                                 torch.tensor(w[first:]), reduction="none") for w in windows]
    return math.exp(torch.cat(nll).double().mean().item())


@pytest.fixture(scope="module")
def tiny_int4(tiny_checkpoint, tmp_path_factory) -> Path:
    from mixtral_export.graphs.onnx_export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("int4") / "tiny-int4", dtype="float32", batch=2,
                       prefill_chunk=8, cache_slots=32, weights="int4", block_size=32)


def eval_json(*args) -> dict:
    run = cli("eval", *args, "--json", "-")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_perplexity_equals_transformers_exp_mean_nll(tiny_onnx, token_file, hf_model):
    ids = [int(x) for x in token_file.read_text().replace(",", " ").split()]
    windows = np.array(ids[:5 * CTX]).reshape(5, CTX)  # (W, ctx): the last partial window dropped
    expected = hf_perplexity(hf_model, windows)
    report = eval_json(tiny_onnx, "--tokens", token_file, "--ctx", CTX)
    assert report["tokens_scored"] == 5 * (CTX - CTX // 2) and report["windows"] == 5
    assert report["perplexity"] == pytest.approx(expected, rel=1e-4)


def test_windows_longer_than_the_sliding_window(tiny_onnx, tiny_checkpoint, token_file, hf_model):
    """ctx 64 > the tiny model's 32-token window: the ring wraps inside a window, as transformers slides."""
    ids = [int(x) for x in token_file.read_text().replace(",", " ").split()]
    windows = cut_windows(ids, 64, 1000, token_file)  # (2, 64)
    for runtime in ("ort", "eager"):
        backend, _ = open_step_backend(tiny_onnx, runtime, checkpoint=tiny_checkpoint)
        report, _ = evaluate(backend, windows, EvalOptions(ctx=64))
        assert report.perplexity.value == pytest.approx(hf_perplexity(hf_model, windows), rel=1e-4), runtime


def test_fp32_against_transformers_agrees(tiny_onnx, token_file):
    report = eval_json(tiny_onnx, "--tokens", token_file, "--ctx", CTX, "--reference", "hf")
    assert report["kl_mean"] < 1e-6 and report["kl_max"] < 1e-5
    assert report["top1_agreement"] == 1.0
    assert report["reference_perplexity"] == pytest.approx(report["perplexity"], rel=1e-5)
    assert set(report) >= {"perplexity", "tokens_scored", "reference_perplexity", "kl_mean", "kl_p99", "kl_max",
                           "top1_agreement", "kl_median", "perplexity_change"}


def test_int4_against_the_saved_float_reference(tiny_onnx, tiny_int4, token_file, tmp_path):
    ref = tmp_path / "float.npz"
    float_run = tmp_path / "float.json"
    float_run.write_text("")  # an empty file (a caller's fresh temp file) is free to write
    run = cli("eval", tiny_onnx, "--tokens", token_file, "--ctx", CTX, "--save-logits", ref, "--json", float_run)
    assert run.returncode == 0, run.stderr
    float_ppl = json.loads(float_run.read_text())["perplexity"]
    int4_ppl = eval_json(tiny_int4, "--tokens", token_file, "--ctx", CTX)["perplexity"]
    report = eval_json(tiny_int4, "--tokens", token_file, "--ctx", CTX, "--reference", ref)
    assert report["kl_mean"] > 1e-3 and report["top1_agreement"] < 1.0  # the weights really are quantized
    assert report["reference_perplexity"] == pytest.approx(float_ppl, rel=1e-4)
    assert report["perplexity"] == pytest.approx(int4_ppl, rel=1e-4)
    assert report["perplexity_change"] == pytest.approx(int4_ppl - float_ppl, rel=1e-4)
    assert report["kl_median"] <= report["kl_p99"] <= report["kl_max"]


def test_the_saved_reference_costs_little_kl_accuracy(tiny_onnx, tiny_int4, token_file, tmp_path):
    """uint16 log-prob codes against the float logits themselves: the same KL within 1e-4 relative."""
    ids = [int(x) for x in token_file.read_text().replace(",", " ").split()]
    options = EvalOptions(ctx=CTX, save_logits=str(tmp_path / "ref.npz"))
    windows = cut_windows(ids, CTX, 1000, token_file)
    float_backend, manifest = open_step_backend(tiny_onnx, "ort")
    exact = list(window_logits(float_backend, windows, options.first))  # (n, V) each
    _, saved = evaluate(float_backend, windows, options, model=manifest.config.to_dict())
    logit_reference.save(options.save_logits, saved)
    reference = logit_reference.load(options.save_logits)
    assert Path(options.save_logits).stat().st_size < 0.6 * saved.codes.size * 4  # about half of float32
    int4_backend, _ = open_step_backend(tiny_int4, "ort")
    report, _ = evaluate(int4_backend, windows, EvalOptions(ctx=CTX), reference=reference)
    ours = list(window_logits(int4_backend, windows, options.first))
    kl = np.concatenate([kl_divergence(a, b) for a, b in zip(exact, ours)])
    assert report.kl_mean.value == pytest.approx(kl.mean(), rel=1e-4)
    assert report.kl_max == pytest.approx(kl.max(), rel=1e-4)
    decoded = np.concatenate([reference.log_probs(n) for n in range(len(windows))])
    assert np.abs(decoded - np.concatenate([log_softmax(x) for x in exact])).max() < 1e-3


@pytest.mark.parametrize("content, args, words", [
    (b"", ("--text",), ("is empty",)),
    (b"  \n", ("--text",), ("is empty",)),
    (b"caf\xe9 au lait", ("--text",), ("not UTF-8",)),
    (b"1 2 3", ("--tokens",), ("3 tokens", "fewer than one window")),
    (b"1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 1000", ("--tokens",), ("token id 1000",
                                                                                           "vocabulary of 1000")),
    (b"1, 2, three", ("--tokens",), ("'three' is not a token id",)),
])
def test_bad_input_is_one_line(tiny_onnx, tmp_path, content, args, words):
    path = tmp_path / "input.txt"
    path.write_bytes(content)
    assert_one_line_error(cli("eval", tiny_onnx, *args, path, "--ctx", CTX), str(path), *words)


def test_a_reference_of_other_windows_or_another_model_is_refused(tiny_onnx, token_file, tmp_path):
    ref = tmp_path / "ref.npz"
    assert cli("eval", tiny_onnx, "--tokens", token_file, "--ctx", CTX, "--save-logits", ref).returncode == 0
    assert_one_line_error(cli("eval", tiny_onnx, "--tokens", token_file, "--ctx", 20, "--reference", ref),
                          str(ref), "other windows")
    other = logit_reference.load(ref)
    other = logit_reference.LogitReference(**{**vars(other), "model": {**other.model, "num_hidden_layers": 3}})
    logit_reference.save(tmp_path / "other.npz", other)
    assert_one_line_error(cli("eval", tiny_onnx, "--tokens", token_file, "--ctx", CTX, "--reference",
                              tmp_path / "other.npz"), "another model", "num_hidden_layers")
    assert_one_line_error(cli("eval", tiny_onnx, "--tokens", token_file, "--ctx", CTX, "--reference", token_file),
                          "not a reference written by eval")


def test_options_and_inputs_are_checked_before_scoring(tiny_onnx, token_file, tmp_path):
    assert_one_line_error(cli("eval", tiny_onnx, "--tokens", token_file, "--ctx", 1), "--ctx")
    assert_one_line_error(cli("eval", tiny_onnx, "--ctx", CTX), "--tokens", "--text")
    assert_one_line_error(cli("eval", tiny_onnx, "--tokens", token_file, "--text", token_file), "not both")
    assert_one_line_error(cli("eval", tiny_onnx, "--tokens", token_file, "--ctx", 2000), "max_position_embeddings")
    theirs = tmp_path / "theirs.npz"
    theirs.write_text("not ours")
    assert_one_line_error(cli("eval", tiny_onnx, "--tokens", token_file, "--ctx", CTX, "--save-logits", theirs),
                          "refusing to overwrite")
