"""`mixtral-export bench` runs end to end on the tiny model and writes a well-formed report (no timing checks)."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNTIMES = ("eager", "ort-dense", "ort-gather", "transformers")


def test_bench_on_tiny_writes_the_report(tmp_path):
    """Run from a folder outside the checkout, a relative --work-dir is that folder's, not the checkout's."""
    report, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    args = [sys.executable, "-m", "mixtral_export", "bench", "tiny", "--work-dir", "work",
            "--runtimes", ",".join(RUNTIMES), "--contexts", "8,40", "--decode-steps", "3", "--repeats", "1",
            "--json", str(report)]
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    run = subprocess.run(args + (["--plot", str(plot)] if has_matplotlib else []), cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    data = json.loads(report.read_text())
    artifacts = [Path(r["artifact"]) for r in data["runs"] if r["artifact"]]
    assert artifacts and all(a.is_dir() and a.is_relative_to(tmp_path / "work") for a in artifacts)
    assert {"model", "settings", "machine", "runs", "gather_over_dense"} <= data.keys()
    assert data["machine"]["bound_bandwidth_gbps"] > 0
    assert [r["runtime"] for r in data["runs"]] == list(RUNTIMES)
    for run_record in data["runs"]:
        assert "error" not in run_record, run_record.get("error")
        assert run_record["peak_rss_bytes"] > 0 and run_record["artifact_bytes"] > 0
        assert [p["context"] for p in run_record["contexts"]] == [8, 40]
        for point in run_record["contexts"]:
            for key in ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_step_ms"):
                assert {"median", "min", "max", "n"} <= point[key].keys()
            assert point["bytes_per_token"] > 0 and point["bound_tokens_per_s"] > 0
            assert point["fraction_of_bound"] > 0 and point["vs_transformers"] > 0
    assert {(r["gather"], r["context"]) for r in data["gather_over_dense"]} == {("ort-gather", 8), ("ort-gather", 40)}
    assert "decode tok/s" in run.stdout
    if has_matplotlib:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_unknown_runtimes_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mixtral_export", "bench", "tiny", "--work-dir", str(tmp_path),
                          "--runtimes", "eager,vllm"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error:") and "vllm" in run.stderr


@pytest.mark.slow  # ~1 min: four tiny exports and four workers
def test_bench_builds_one_artifact_per_block_size_and_prefill_chunk(tmp_path):
    """`--block-size 32,64 --prefill-chunk 8,16` A/Bs four int8 artifacts in one interleaved run."""
    report = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "mixtral_export", "bench", "tiny", "--work-dir", str(tmp_path / "work"),
                          "--runtimes", "ort-gather", "--weights", "int8", "--block-size", "32,64",
                          "--prefill-chunk", "8,16", "--cache-slots", "64", "--contexts", "8", "--decode-steps", "2",
                          "--repeats", "1", "--json", str(report)], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    runs = json.loads(report.read_text())["runs"]
    assert [r["label"] for r in runs] == ["ort-gather p8 int8 b32", "ort-gather p8 int8 b64",
                                          "ort-gather p16 int8 b32", "ort-gather p16 int8 b64"]
    assert [(r["prefill_chunk"], r["block_size"]) for r in runs] == [(8, 32), (8, 64), (16, 32), (16, 64)]
    assert len({r["artifact"] for r in runs}) == 4 and all("error" not in r for r in runs)
    manifests = [json.loads((Path(r["artifact"]) / "manifest.json").read_text()) for r in runs]
    assert [(m["shapes"]["prefill_chunk"], m["quantization"]["block_size"]) for m in manifests] == \
        [(8, 32), (8, 64), (16, 32), (16, 64)]
    assert runs[0]["contexts"][0]["bytes_per_token"] > runs[1]["contexts"][0]["bytes_per_token"]  # b32's scales


@pytest.mark.slow  # ~40 s: two tiny exports and two workers
def test_bench_times_one_artifact_serving_a_list_of_prefill_chunks(tmp_path):
    """`--prefill-chunk 16,4+16`: the second artifact serves T = 4 and 16 (and 1), labelled p4+16."""
    report = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "mixtral_export", "bench", "tiny", "--work-dir", str(tmp_path / "work"),
                          "--runtimes", "ort-gather", "--prefill-chunk", "16,4+16", "--cache-slots", "64",
                          "--contexts", "4,16", "--decode-steps", "2", "--repeats", "1", "--json", str(report)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    runs = json.loads(report.read_text())["runs"]
    assert [r["label"] for r in runs] == ["ort-gather p16", "ort-gather p4+16"] and all("error" not in r for r in runs)
    assert [r["prefill_chunks"] for r in runs] == [[16], [4, 16]]
    manifests = [json.loads((Path(r["artifact"]) / "manifest.json").read_text()) for r in runs]
    assert [m["chunks"] for m in manifests] == [[16, 1], [16, 4, 1]]


def test_our_ring_matches_llama_cpps_capacity_only_when_llama_cpp_runs_and_no_ring_is_asked_for():
    """equal_capacity: llama.cpp gets the longest context + decode steps + 1 cells; ours the power of two above."""
    from mixtral_export.bench.run import BenchOptions, equal_capacity

    options = BenchOptions(model="tiny", runtimes=("ort-gather", "llama.cpp"), contexts=(16, 128), decode_steps=16,
                           prefill_chunk=(16, (16, 128))).resolved()
    assert options.llama_context == 145
    assert equal_capacity(options) == (256,)
    assert equal_capacity(replace(options, cache_slots=(4096,))) == (4096,)
    assert equal_capacity(replace(options, runtimes=("ort-gather",))) == (None,)


def test_llama_cpp_runs_once_per_kv_type_with_the_matching_cache_type(tmp_path, monkeypatch):
    """runs_on/job: llama.cpp gets one job per --kv-dtype (int8 as its q8_0 cache), not one per ring size,
    and no ring of ours; ort-gather one per ring size and KV type."""
    from mixtral_export.artifact.contract import StepShapes
    from mixtral_export.bench.models import bench_model
    from mixtral_export.bench.run import BenchOptions, job, runs_on

    model = bench_model("tiny", 1, tmp_path)
    config = model.config
    options = BenchOptions(model="tiny", runtimes=("ort-gather", "llama.cpp"), contexts=(16,), decode_steps=4,
                           cache_slots=(256, 4096), kv_dtype=("float32", "int8")).resolved()
    shapes = [StepShapes.for_config(config, batch=1, prefill_chunk=16, cache_slots=s, span_axis=True, kv_dtype=k)
              for s in options.cache_slots for k in options.kv_dtype]
    assert [(s.cache_slots, s.cache_dtype) for s in runs_on("ort-gather", shapes)] == [
        (256, "float32"), (256, "int8"), (4096, "float32"), (4096, "int8")]
    gguf = tmp_path / "model.q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr("mixtral_export.bench.run.decode_weight_bytes", lambda *args: 1)  # not a real GGUF file
    specs = [job(options, model, "llama.cpp", s, gguf, "q8_0") for s in runs_on("llama.cpp", shapes)]
    assert [(s["llama_kv"], s["label"], s["cache_slots"]) for s in specs] == [
        ("float32", "llama.cpp kv f32 q8_0", None), ("int8", "llama.cpp kv q8_0 q8_0", None)]


def test_constrained_bench_runs_on_tiny_and_prints_each_mode_against_its_baseline(tmp_path):
    pytest.importorskip("llguidance")
    run = subprocess.run([sys.executable, "-m", "mixtral_export.bench.constrained", "tiny", "--rounds", "1",
                          "--tokens", "56", "--work-dir", str(tmp_path / "work")],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    for mode, base in (("greedy + schema", "greedy"), ("sampled + schema", "sampled")):
        assert re.search(rf"^{re.escape(mode)} *: +[\d.]+ ms/token .*[\d.]+x {base}$", run.stdout, re.M), run.stdout
