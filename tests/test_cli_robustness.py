"""What a new user hits first: one-line errors, Ctrl-C, missing extras, torch-free commands, and
nothing of the user's ever deleted or overwritten. Real subprocesses, as users run them."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cli import REPO, assert_one_line_error, cli

# A command run in-process by `python -c`, reporting at exit whether torch was ever imported.
PROBE = ("import atexit, sys; atexit.register(lambda: print('TORCH-IMPORTED' if 'torch' in sys.modules "
         "else 'TORCH-FREE', file=sys.stderr)); sys.argv = ['mixtral-export', *sys.argv[1:]]; "
         "from mixtral_export.entry import main; main()")


def probe(*args, block: str | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in a child that reports torch at exit, or whose `block` module (e.g. torch) cannot
    be imported, as without an extra."""
    code = f"import sys; sys.modules[{block!r}] = None; {PROBE.split('; ', 2)[2]}" if block else PROBE
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args", [
    ("--help",), ("generate", "--help"), ("inspect", "{art}"), ("check-trt", "{art}"),
    ("generate", "{art}", "--runtime", "ort", "--prompt", "Hello", "--max-new-tokens", "3"),
])
def test_serving_commands_never_import_torch(tiny_onnx, args):
    run = probe(*(a.format(art=tiny_onnx) for a in args))
    assert run.returncode == 0, run.stderr
    assert "TORCH-FREE" in run.stderr, run.stderr


def test_a_missing_extra_is_one_line_naming_it(tmp_path):
    run = probe("tiny", tmp_path / "ck", block="torch")
    # PyPI's torch is the multi-GB CUDA build: the install script picks the machine's, or the CPU index first
    assert_one_line_error(run, "mixtral-export tiny needs torch", "EXTRAS=export bash scripts/install.sh",
                          "pip install torch --index-url https://download.pytorch.org/whl/cpu before")
    assert not (tmp_path / "ck").exists()


def test_a_missing_extra_without_torch_keeps_the_pip_line(tiny_onnx):
    run = probe("serve", tiny_onnx, block="fastapi")
    assert_one_line_error(run, "mixtral-export serve needs fastapi", "pip install 'mixtral-export[serve]'")


def test_empty_stop_string_is_one_line(tiny_onnx):
    assert_one_line_error(cli("generate", tiny_onnx, "--prompt", "Hi", "--stop", "", ok=False), "--stop")


def test_prompt_text_without_a_tokenizer_is_one_line(tiny_checkpoint, tmp_path):
    bare = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ck"))
    (bare / "tokenizer.model").unlink()
    cli("export", bare, "-o", tmp_path / "art", "--prefill-chunk", "8")
    assert_one_line_error(cli("generate", tmp_path / "art", "--prompt", "Hi", ok=False), "tokenizer", "--input-ids")
    cli("generate", tmp_path / "art", "--input-ids", "1,5,6", "--max-new-tokens", "2")


def interrupt(args: list, after: float) -> subprocess.CompletedProcess:
    child = subprocess.Popen([sys.executable, "-m", "mixtral_export", *map(str, args)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(after)
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=120)
    return subprocess.CompletedProcess(args, child.returncode, stdout, stderr)


@pytest.mark.parametrize("after", [0.3, 0.8, 1.5, 3.0])
def test_ctrl_c_at_any_moment_is_one_line_and_leaves_nothing(tiny_checkpoint, tmp_path, after):
    """Early signals land while torch is half imported, later ones mid-export."""
    run = interrupt(["export", tiny_checkpoint, "-o", tmp_path / "art"], after)
    if run.returncode == 0:  # finished before the signal: nothing to check at this delay on this machine
        return
    if run.stderr.startswith("Fatal Python error: init_import_site"):
        pytest.skip("the signal came while the interpreter itself was starting, before any program runs")
    assert run.returncode == 130, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr
    assert [line for line in run.stderr.splitlines() if line.strip()] == ["interrupted"], run.stderr
    assert list(tmp_path.iterdir()) == []


def test_tiny_refuses_a_folder_of_the_users_and_replaces_its_own(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert_one_line_error(cli("tiny", mine, ok=False), "notes.txt", "refusing")
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    cli("tiny", tmp_path / "ck")
    cli("tiny", tmp_path / "ck", "--seed", "1")  # its own output: replaced
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["written_by"] == "mixtral-export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "mine"]


def test_tiny_refuses_a_checkpoint_it_did_not_write(tmp_path):
    from tests.reference_models import hf_reference

    hf_reference(tmp_path / "hf")
    before = sorted((p.name, p.stat().st_size) for p in (tmp_path / "hf").iterdir())
    assert_one_line_error(cli("tiny", tmp_path / "hf", ok=False), "did not write")
    assert sorted((p.name, p.stat().st_size) for p in (tmp_path / "hf").iterdir()) == before


def test_export_keeps_a_users_file_beside_an_old_artifact(tiny_onnx, tiny_checkpoint, tmp_path):
    art = Path(shutil.copytree(tiny_onnx, tmp_path / "art"))
    (art / "notes.txt").write_text("keep me")
    assert_one_line_error(cli("export", tiny_checkpoint, "-o", art, ok=False), "notes.txt")
    assert (art / "notes.txt").read_text() == "keep me"
    (art / "notes.txt").unlink()
    cli("export", tiny_checkpoint, "-o", art, "--batch", "2", "--prefill-chunk", "8")  # an artifact alone: replaced


def test_build_engine_keeps_an_engine_plan_it_did_not_list(tiny_onnx, tmp_path):
    art = Path(shutil.copytree(tiny_onnx, tmp_path / "art"))
    (art / "engine.plan").write_bytes(b"someone else's")
    assert_one_line_error(cli("build-engine", art, ok=False), "engine.plan", "refusing")
    assert (art / "engine.plan").read_bytes() == b"someone else's"


def test_verify_report_overwrites_only_its_own_report(tiny_onnx, tmp_path):
    theirs = tmp_path / "theirs.json"
    theirs.write_text('{"mine": true}\n')
    assert_one_line_error(cli("verify", tiny_onnx, "--steps", "2", "--report", theirs, ok=False), "theirs.json")
    assert theirs.read_text() == '{"mine": true}\n'
    ours = tmp_path / "ours.json"
    for _ in range(2):  # the second run replaces the first run's report
        cli("verify", tiny_onnx, "--steps", "2", "--report", ours)
    report = json.loads(ours.read_text())
    assert report["written_by"] == "mixtral-export verify" and report["passed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.json", "theirs.json"]


def test_bench_refuses_a_foreign_json_before_measuring(tmp_path):
    theirs = tmp_path / "results.json"
    theirs.write_text("[]")
    started = time.monotonic()
    run = cli("bench", "tiny", "--json", theirs, "--work-dir", tmp_path / "work", ok=False)
    assert_one_line_error(run, "results.json")
    assert theirs.read_text() == "[]" and not (tmp_path / "work").exists()
    assert time.monotonic() - started < 60


def test_no_window_generation_stops_at_the_cache_and_says_why(tiny_checkpoint, tmp_path):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    ck = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ck"))
    (ck / "config.json").write_text(json.dumps({**config, "sliding_window": None}))
    cli("export", ck, "-o", tmp_path / "art", "--cache-slots", "16", "--prefill-chunk", "8")
    run = cli("generate", tmp_path / "art", "--input-ids", "1,5,6,7", "--max-new-tokens", "40")
    assert "cache_full" in run.stderr and "--cache-slots" in run.stderr
    assert "at most 16 positions" in run.stderr and "--slide" in run.stderr


def test_a_sliding_window_generation_at_the_models_limit_says_so(tiny_onnx):
    """The ring slides, so only max_position_embeddings (1024 for the tiny model) ends the text:
    neither more --cache-slots nor --slide would help, and the line does not advise them."""
    run = cli("generate", tiny_onnx, "--input-ids", "1,5,6,7", "--max-new-tokens", "1100", "--json")
    assert json.loads(run.stdout)["completions"][0]["finish_reason"] == "cache_full"
    run = cli("generate", tiny_onnx, "--input-ids", "1,5,6,7", "--max-new-tokens", "1100")
    # 4 prompt positions, the last new token sampled at position 1023 and never fed
    assert f"{1024 - 4 + 1} new tokens" in run.stderr and "max_position_embeddings (1024) is reached" in run.stderr
    assert "--cache-slots" not in run.stderr and "--slide" not in run.stderr


@pytest.mark.parametrize("args, words", [
    (("export", "--frobnicate"), ("no such option: --frobnicate", "(mixtral-export export --help)")),
    (("inspect",), ("missing argument 'ARTIFACT'", "(mixtral-export inspect --help)")),
    (("frobnicate",), ("no such command 'frobnicate'",)),
    (("generate", "art", "--max-new-tokens", "0"), ("'--max-new-tokens'",)),
    (("generate", "art", "--top-k", "-1"), ("'--top-k'",)),
    (("serve", "art", "--rows", "0"), ("'--rows'",)),
    (("export", "ck", "-o", "art", "--cache-slots", "0"), ("'--cache-slots'",)),
])
def test_usage_errors_are_one_line(args, words):
    """click's Usage:/Try/Error: block is one line naming the command's --help, exit 2, before any work."""
    assert_one_line_error(cli(*args, ok=False), *words)


@pytest.mark.parametrize("args, words", [
    (("--prompt", "Hi", "--input-ids", "1,2"), ("--prompt", "--input-ids", "not both")),
    (("--prompt", "Hi", "--stop", ""), ("--stop",)),
    (("--prompt", "Hi", "--top-p", "0"), ("--top-p",)),
    (("--prompt", "Hi", "--repetition-penalty", "0"), ("--repetition-penalty",)),
])
def test_generate_messages_name_flags(tiny_onnx, args, words):
    run = cli("generate", tiny_onnx, *args, ok=False)
    assert_one_line_error(run, *words)
    assert not any(name in run.stderr for name in ("stop_strings", "top_p", "repetition_penalty", "input_ids"))


def test_serve_rows_past_the_batch_names_the_flag(tiny_onnx):
    run = cli("serve", tiny_onnx, "--rows", "3", "--port", "0", ok=False)
    assert_one_line_error(run, "--rows 3", "batch (2")
    assert "rows must be" not in run.stderr and run.stdout == ""


def test_a_usage_error_prints_no_usage_block(tiny_onnx):
    run = cli("generate", tiny_onnx, "--frobnicate", ok=False)
    assert "Usage:" not in run.stderr and "Try " not in run.stderr and not run.stdout


def test_importing_the_cli_leaves_typers_classes_alone():
    """Nothing is patched at import: a program that embeds typer (or our app) keeps typer's behaviour."""
    code = ("import typer.core as core; before = {c: dict(vars(c)) for c in (core.TyperArgument, core.TyperOption, "
            "core.TyperCommand, core.TyperGroup)}; import mixtral_export.cli; "
            "changed = [c.__name__ for c, attrs in before.items() if dict(vars(c)) != attrs]; print(changed)")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr


def test_serve_on_a_port_in_use_is_one_line_before_anything(tiny_onnx):
    """Checked before the artifact is opened: no "serving ..." line, no uvicorn error, exit 2."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = cli("serve", tiny_onnx, "--host", "127.0.0.1", "--port", port, ok=False)
    assert_one_line_error(run, f"127.0.0.1:{port}", "in use", "--port")
    assert run.stdout == ""
