"""The command line as users run it: real subprocesses, exit codes, one-line errors, no tracebacks."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cli(*args, ok=True) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "mixtral_export", *map(str, args)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    if ok:
        assert run.returncode == 0, run.stderr
    return run


def assert_one_line_error(run: subprocess.CompletedProcess, *words: str) -> None:
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), run.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def artifact_copy(tiny_onnx, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_onnx, tmp_path / "artifact"))


def test_generate_json_carries_ids_text_and_timings(tiny_onnx):
    run = cli("generate", tiny_onnx, "--runtime", "ort", "--prompt", "Hello there", "--max-new-tokens", "12", "--json")
    data = json.loads(run.stdout)
    completion = data["completions"][0]
    assert data["runtime"] == "ort" and completion["prompt_ids"][0] == 1
    assert len(completion["token_ids"]) == 12 and isinstance(completion["text"], str)
    assert data["prefill_seconds"] > 0 and data["decode_seconds"] > 0


def test_ort_and_eager_generate_the_same_greedy_tokens(tiny_onnx):
    args = ("generate", tiny_onnx, "--input-ids", "1,50,60,70", "--max-new-tokens", "40", "--json")
    ort = json.loads(cli(*args, "--runtime", "ort").stdout)["completions"][0]["token_ids"]
    eager = json.loads(cli(*args, "--runtime", "eager").stdout)["completions"][0]["token_ids"]
    assert ort == eager


def test_sampling_with_a_seed_is_reproducible(tiny_onnx):
    args = ("generate", tiny_onnx, "--chat", "--prompt", "Hi", "--temperature", "0.9", "--top-p", "0.9",
            "--seed", "7", "--max-new-tokens", "16", "--json")
    assert json.loads(cli(*args).stdout)["completions"] == json.loads(cli(*args).stdout)["completions"]


def test_streaming_text_mode_prints_the_continuation(tiny_onnx):
    run = cli("generate", tiny_onnx, "--prompt", "The", "--max-new-tokens", "8")
    assert run.stdout.strip() and "new tokens" in run.stderr


def test_verify_passes_and_reports_json(tiny_onnx):
    run = cli("verify", tiny_onnx, "--runtimes", "eager,ort", "--steps", "40", "--json")
    report = json.loads(run.stdout)
    assert report["passed"] and report["comparisons"][0]["max_abs"] <= 1e-4


def test_verify_against_transformers_as_the_demo_runs_it(tiny_onnx):
    run = cli("verify", tiny_onnx, "--runtimes", "eager,ort", "--reference", "hf", "--steps", "24", "--json")
    report = json.loads(run.stdout)
    against = {(c["runtime"], c["against"]): c for c in report["comparisons"]}
    assert set(against) == {("ort", "eager"), ("eager", "hf"), ("ort", "hf")}
    assert report["passed"] and all(c["max_abs"] <= 1e-4 and c["top1_agreement"] == 1.0 for c in against.values())
    assert all(d is None for c in against.values() for d in c["first_divergence"])


def test_inspect_lists_files_and_shapes(tiny_onnx):
    run = cli("inspect", tiny_onnx)
    assert "model.onnx.data" in run.stdout and "cache slots 32" in run.stdout
    assert "sha256_blocks/64M" in run.stdout  # the hash scheme beside each file


def test_inspect_prints_the_io_contract(tiny_onnx):
    """Every input and output of the manifest's io, with its dtype and each chunk length's shape."""
    from mixtral_export.artifact.manifest import load_manifest

    lines = cli("inspect", tiny_onnx).stdout.splitlines()
    io = load_manifest(tiny_onnx, verify_files=False).io
    for entry in io["inputs"] + io["outputs"]:
        stem = entry["name"].split(".")[0]  # cache_k.0 and cache_k.1 share a row: cache_k.0..1
        shapes = " | ".join(dict.fromkeys(f"({', '.join(map(str, s))})" for s in entry["shapes"].values()))
        assert any(stem in line and entry["dtype"] in line and shapes in line for line in lines), (entry, lines)


def test_piped_output_prints_whole_rows(tiny_onnx):
    """A pipe (a CI log) gets every table row and line whole, not cut at 80 columns (`paddi…`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    for args in (("inspect", tiny_onnx), ("verify", tiny_onnx, "--runtimes", "eager,ort", "--steps", "4")):
        run = subprocess.run([sys.executable, "-m", "mixtral_export", *map(str, args)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert "…" not in run.stdout, run.stdout
        if args[0] == "inspect":
            assert any(line.strip().startswith("model") and "sliding window 32" in line
                       for line in run.stdout.splitlines()), run.stdout
        else:
            assert any(all(word in line for word in ("runtime", "max|dlogit|", "mean|dlogit|", "diverges at", "result"))
                       for line in run.stdout.splitlines()), run.stdout


def test_tiny_is_deterministic(tmp_path):
    cli("tiny", tmp_path / "a")
    cli("tiny", tmp_path / "b")
    for name in ("model.safetensors", "config.json", "tokenizer.model"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_truncated_onnx_is_refused(artifact_copy):
    graph = artifact_copy / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    assert_one_line_error(cli("generate", artifact_copy, "--prompt", "x", ok=False), "model.onnx")


def test_tampered_weights_are_refused(artifact_copy):
    data = artifact_copy / "model.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[1234] ^= 0xFF
    data.write_bytes(bytes(blob))
    assert_one_line_error(cli("generate", artifact_copy, "--prompt", "x", ok=False), "model.onnx.data", "sha256")


def test_artifact_of_another_config_is_refused_for_eager(artifact_copy, tmp_path):
    from tests.reference_models import hf_reference

    hf_reference(tmp_path / "other")
    run = cli("generate", artifact_copy, "--runtime", "eager", "--checkpoint", tmp_path / "other",
              "--prompt", "x", ok=False)
    assert_one_line_error(run, "vocab_size")


def test_token_ids_out_of_range_are_refused(tiny_onnx):
    assert_one_line_error(cli("generate", tiny_onnx, "--input-ids", "1,2,5000", ok=False), "5000")


def test_prompt_longer_than_the_cache_is_refused(tiny_checkpoint, tmp_path):
    """Without a sliding window the ring cannot slide: a prompt past cache_slots is an error."""
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    no_window = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ck"))
    (no_window / "config.json").write_text(json.dumps({**config, "sliding_window": None}))
    cli("export", no_window, "-o", tmp_path / "art", "--cache-slots", "16", "--prefill-chunk", "8")
    ids = ",".join(["7"] * 20)
    assert_one_line_error(cli("generate", tmp_path / "art", "--input-ids", ids, ok=False), "20", "16")


def test_unwritable_output_folder_is_one_line_and_leaves_nothing(tiny_checkpoint, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_one_line_error(cli("export", tiny_checkpoint, "-o", blocker / "art", ok=False), str(blocker))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_missing_checkpoint_is_one_line(tmp_path):
    assert_one_line_error(cli("export", tmp_path / "nope", "-o", tmp_path / "art", ok=False), "nope")
    assert not (tmp_path / "art").exists()


def test_chat_with_input_ids_is_a_usage_error(tiny_onnx):
    assert_one_line_error(cli("generate", tiny_onnx, "--input-ids", "1,2", "--chat", ok=False), "--chat")


def test_brackets_in_an_error_are_printed_verbatim(tmp_path):
    missing = tmp_path / "ckpt[/][bold]"
    assert_one_line_error(cli("export", missing, "-o", tmp_path / "art", ok=False), "ckpt[/][bold]")


def test_brackets_in_an_artifact_path_are_printed_verbatim(artifact_copy):
    odd = artifact_copy.rename(artifact_copy.parent / "art[bold]")
    assert "art[bold]" in cli("inspect", odd).stdout


def test_generate_system_prompt_implies_chat(tiny_onnx):
    from mixtral_export.runtimes.session import Session

    run = cli("generate", tiny_onnx, "--system", "Be brief.", "--prompt", "Hi", "--max-new-tokens", "2", "--json")
    want = Session.open(tiny_onnx).encode_chat([{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Hi"}])
    assert json.loads(run.stdout)["completions"][0]["prompt_ids"] == want


def test_export_serves_a_comma_list_of_prefill_chunks(tiny_checkpoint, tmp_path):
    run = cli("export", tiny_checkpoint, "-o", tmp_path / "art", "--prefill-chunk", "8,4", "--cache-slots", "32")
    assert "prefill chunk 4, 8, decode chunk 1" in run.stdout
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["chunks"] == [8, 4, 1]
    assert_one_line_error(cli("export", tiny_checkpoint, "-o", tmp_path / "bad", "--prefill-chunk", "4,x", ok=False),
                          "--prefill-chunk")
    assert not (tmp_path / "bad").exists()


def test_the_demo_runs_the_main_job_end_to_end(tmp_path):
    """The README's first command (scripts/demo.sh runs exactly this): it calls the other commands'
    functions directly, so a new option on one of them must not break it."""
    run = cli("demo", tmp_path / "demo")
    assert "all within tolerance" in run.stdout and "Traceback" not in run.stderr, run.stdout[-2000:]
    report = json.loads((tmp_path / "demo" / "verify.json").read_text())
    assert report["passed"] is True and report["comparisons"], report.get("comparisons")


def test_demo_script_takes_a_relative_out_from_the_callers_folder(tmp_path):
    """scripts/demo.sh cds into the checkout to install: a relative OUT must still land where the
    caller ran it. $PYTHON stands in for the interpreter and records each call (no install runs)."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n')
    fake.chmod(0o755)
    caller = tmp_path / "caller"
    caller.mkdir()
    run = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "rel/out"], cwd=caller, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHON": str(fake)})
    assert run.returncode == 0, run.stderr
    assert calls.read_text().splitlines()[-1] == f"-m mixtral_export demo {caller / 'rel' / 'out'}"
