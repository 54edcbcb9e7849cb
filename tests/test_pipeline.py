"""Pipeline stages in one process: the split, parity with transformers and the whole artifact, bad input.

One 4-layer reference model (transformers' save_pretrained, decisive weights) is exported whole and
in stages: 2 stages by the default byte-balanced split, 3 stages of 1, 2, 1 layers with gathered
routing, and 2 stages with int8 weights. A staged artifact must give transformers' greedy tokens
and the whole artifact's logits within 1e-5 (fp32), with its rows in one group or in several
groups in flight through the stages together (row groups).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from mixtral_export.artifact.manifest import ManifestError, load_manifest
from mixtral_export.graphs.artifact_folder import ExportError
from mixtral_export.graphs.onnx_export import export_onnx
from mixtral_export.errors import UsageError
from mixtral_export.runtimes.engine import Engine
from mixtral_export.runtimes.generate import generate
from mixtral_export.runtimes.load import RuntimeLoadError, open_step_backend
from mixtral_export.runtimes.requests import GenerationConfig
from mixtral_export.runtimes.sampling import SamplingParams
from mixtral_export.runtimes.verify import teacher_forced, verify_artifact
from tests.reference_models import hf_reference, random_prompts, reference_greedy

LAYERS = 4
SHAPES = dict(dtype="float32", batch=2, prefill_chunk=(4, 8), cache_slots=8)
STEPS = 20  # past the 8-slot window: every stage's ring wraps


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline") / "checkpoint"
    return folder, hf_reference(folder, seed=3, num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def whole(reference, tmp_path_factory) -> Path:
    return export_onnx(reference[0], tmp_path_factory.mktemp("whole") / "art", **SHAPES)


@pytest.fixture(scope="module")
def staged(reference, tmp_path_factory) -> Path:
    return export_onnx(reference[0], tmp_path_factory.mktemp("staged") / "art", stages=2, **SHAPES)


def greedy(backend, prompts):
    config = GenerationConfig(max_new_tokens=STEPS, sampling=SamplingParams(), eos_token_ids=())
    return [c.token_ids for c in generate(backend, prompts, config).completions]


def stage_bytes(artifact: Path) -> list[int]:
    top = load_manifest(artifact, verify_files=False)
    return [sum(f.stat().st_size for f in top.stage_folder(i).iterdir() if f.name != "manifest.json")
            for i in range(len(top.stages))]


def graph_bytes(artifact: Path) -> int:
    return sum(f.stat().st_size for f in artifact.iterdir() if f.suffix in (".onnx", ".data"))


def test_default_split_balances_bytes_and_stores_each_weight_once(staged, whole):
    top = load_manifest(staged)
    assert [e["layers"] for e in top.stages] == [[0, 2], [2, 4]]
    sizes, total = stage_bytes(staged), graph_bytes(whole)
    assert max(sizes) <= 0.7 * total
    assert sum(sizes) <= 1.05 * total
    for index in range(2):  # each folder: its own graph, weights and manifest with the export's id
        stage = load_manifest(top.stage_folder(index))
        assert stage.export_id == top.export_id and stage.stage.index == index
        assert sorted(stage.files) == ["model.onnx", "model.onnx.data"]
    names = [e["name"] for e in load_manifest(top.stage_folder(1)).io["inputs"]]
    assert names[:2] == ["hidden", "positions"] and "cache_k.2" in names and "cache_k.1" not in names


def test_staged_tokens_equal_transformers_and_whole_logits_within_1e5(reference, staged, whole):
    prompts = random_prompts([5, 19, 11], vocab_size=128, seed=4)  # 3 prompts on 2 rows: a row is reused
    backend, _ = open_step_backend(staged, "ort")
    whole_backend, _ = open_step_backend(whole, "ort")
    ours = greedy(backend, prompts)
    assert ours == reference_greedy(reference[1], prompts, STEPS)
    assert ours == greedy(whole_backend, prompts)
    staged_logits = teacher_forced(backend, prompts, ours)
    whole_logits = teacher_forced(whole_backend, prompts, ours)
    for a, b in zip(staged_logits, whole_logits):
        assert np.abs(a - b).max() <= 1e-5


def test_explicit_split_with_gathered_routing(reference, whole, tmp_path):
    art = export_onnx(reference[0], tmp_path / "art", stage_layers=(1, 2, 1), routing="gather", **SHAPES)
    assert [e["layers"] for e in load_manifest(art).stages] == [[0, 1], [1, 3], [3, 4]]
    prompts = random_prompts([7, 13], vocab_size=128, seed=5)
    backend, _ = open_step_backend(art, "ort")
    assert greedy(backend, prompts) == reference_greedy(reference[1], prompts, STEPS)


def test_quantized_stages_equal_the_whole_quantized_artifact(reference, tmp_path):
    options = dict(SHAPES, weights="int8", block_size=32)
    art = export_onnx(reference[0], tmp_path / "art", stages=2, **options)
    whole = export_onnx(reference[0], tmp_path / "whole", **options)
    top = load_manifest(art)
    assert {name.split(".")[1] for name in top.quantization["tensors"] if name.startswith("layers.")} == \
        {"0", "1", "2", "3"}  # every stage's tensors, under the model's layer numbers
    assert top.quantization["tensors"] == load_manifest(whole).quantization["tensors"]
    prompts = random_prompts([6, 12], vocab_size=128, seed=6)
    staged_backend, whole_backend = open_step_backend(art, "ort")[0], open_step_backend(whole, "ort")[0]
    tokens = greedy(staged_backend, prompts)
    assert tokens == greedy(whole_backend, prompts)
    for a, b in zip(teacher_forced(staged_backend, prompts, tokens), teacher_forced(whole_backend, prompts, tokens)):
        assert np.abs(a - b).max() <= 1e-5


def test_verify_passes_on_a_staged_artifact(staged):
    report = verify_artifact(staged, ["eager", "ort"], steps=STEPS)
    assert report.passed
    assert report.comparisons[0].max_abs <= 1e-5


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixtral_export", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_more_stages_than_layers_is_one_line_exit_2(reference, tmp_path):
    with pytest.raises(ExportError, match="more than the model's 4 layers"):
        export_onnx(reference[0], tmp_path / "art", stages=5, **SHAPES)
    with pytest.raises(ExportError, match="adding up to the model's 4 layers"):
        export_onnx(reference[0], tmp_path / "art", stage_layers=(2, 1), **SHAPES)
    done = cli("export", reference[0], "-o", tmp_path / "art", "--stages", "5", "--dtype", "float32")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "more than the model's 4 layers" in done.stderr and not (tmp_path / "art").exists()


def test_missing_stage_folder_is_one_line_exit_2(staged, tmp_path):
    copy = shutil.copytree(staged, tmp_path / "copy")
    assert open_step_backend(copy, "ort")[0].step is not None  # control: the whole copy opens
    shutil.rmtree(copy / "stage-1")
    with pytest.raises(ManifestError, match="stage 1 .* is missing"):
        open_step_backend(copy, "ort")
    done = cli("generate", copy, "--input-ids", "1,2,3", "--json")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "stage-1" in done.stderr and "missing" in done.stderr


def test_stages_of_different_exports_are_refused(reference, staged, tmp_path):
    other = export_onnx(reference[0], tmp_path / "other", stages=2, **SHAPES)  # the same split, another export
    copy = shutil.copytree(staged, tmp_path / "copy")
    shutil.rmtree(copy / "stage-1")
    shutil.copytree(other / "stage-1", copy / "stage-1")
    with pytest.raises(ManifestError, match="another export"):
        open_step_backend(copy, "ort")
    done = cli("generate", copy, "--input-ids", "1,2,3", "--json")
    assert done.returncode == 2 and "another export" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = cli("inspect", copy)
    assert done.returncode == 2 and "another export" in done.stderr


def test_a_stage_folder_alone_is_refused_naming_the_top(staged):
    done = cli("generate", staged / "stage-0", "--input-ids", "1,2,3")
    assert done.returncode == 2 and "stage 0 of a staged artifact" in done.stderr


def test_cli_generate_and_inspect_on_stages(staged, whole):
    ids = "1,9,17,33,65,7"
    runs = [cli("generate", art, "--input-ids", ids, "--json", "--max-new-tokens", STEPS) for art in (staged, whole)]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    tokens = [json.loads(r.stdout)["completions"][0]["token_ids"] for r in runs]
    assert tokens[0] == tokens[1] and len(tokens[0]) == STEPS
    shown = cli("inspect", staged)
    assert shown.returncode == 0, shown.stderr
    assert "stage   0  stage-0/  layers 0..1 + embedding" in shown.stdout
    assert "stage   1  stage-1/  layers 2..3 + final norm and lm_head" in shown.stdout


def test_serve_on_a_staged_artifact_answers_as_the_whole_one(tiny_checkpoint, tiny_onnx, tmp_path):
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from tests.test_serve import Server

    art = export_onnx(tiny_checkpoint, tmp_path / "art", dtype="float32", batch=2, prefill_chunk=8, cache_slots=32,
                      stages=2)
    server = Server(art)  # the engine in a process of its own, both stages in it
    assert_serves_as_the_whole(server, tiny_onnx, ("Simple is better", "Flat is better than nested"))


def assert_serves_as_the_whole(server, whole_artifact, prompts) -> None:
    """Each prompt's greedy completion from the staged server equals the whole artifact's; stops the
    server, which must exit 0."""
    from mixtral_export.runtimes.session import Session

    try:
        with Session.open(whole_artifact) as whole:
            for prompt in prompts:
                reply = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
                expected = whole.generate_ids([whole.encode(prompt)], max_new_tokens=12).completions[0]
                assert reply.choices[0].text == expected.text
    finally:
        code, output = server.stop()
    assert code == 0, output


def test_a_tied_table_is_stored_once_and_looked_up_by_the_last_stage(tmp_path):
    """tie_word_embeddings: stage 0 takes embedded ids, read from the LM head the last stage holds;
    control: the table is the whole export's largest tensor, so holding it twice would break 5%."""
    model = hf_reference(tmp_path / "checkpoint", seed=5, num_hidden_layers=2, tie_word_embeddings=True,
                         vocab_size=1000)
    options = dict(dtype="float32", batch=2, prefill_chunk=8, cache_slots=8)
    whole = export_onnx(tmp_path / "checkpoint", tmp_path / "whole", **options)
    staged = export_onnx(tmp_path / "checkpoint", tmp_path / "staged", stages=2, **options)
    table = 1000 * 64 * 4
    assert table > 0.05 * graph_bytes(whole)
    assert sum(stage_bytes(staged)) <= 1.05 * graph_bytes(whole) and max(stage_bytes(staged)) <= 0.7 * graph_bytes(whole)
    first = load_manifest(staged / "stage-0").io["inputs"][0]["name"]
    assert first == "hidden"
    prompts = random_prompts([5, 12], vocab_size=1000, seed=6)
    backend, _ = open_step_backend(staged, "ort")
    tokens = greedy(backend, prompts)
    assert tokens == reference_greedy(model, prompts, STEPS)
    assert tokens == greedy(open_step_backend(whole, "ort")[0], prompts)
    grouped = open_step_backend(staged, "ort", row_groups=2)[0]  # each group's ids looked up on its own
    assert greedy(grouped, prompts + prompts[::-1]) == tokens + tokens[::-1]
    grouped.close()


class Recorder:
    """A request's sampler: greedy, keeping the logits (V,) of each step."""

    def __init__(self):
        self.logits = []

    def next_tokens(self, logits: np.ndarray, history: list[list[int]]) -> np.ndarray:
        self.logits.append(np.array(logits[0]))
        return logits.argmax(axis=-1).astype(np.int64)


ARRIVALS = {0: 2, 1: 1, 4: 2, 9: 2}  # engine step -> requests arriving then: 7 requests, rows reused


def staggered(backend, prompts: list[list[int]]) -> tuple[list[list[int]], list[np.ndarray]]:
    """Continuous batching with requests arriving at different steps and of different lengths:
    each request's greedy tokens and its logits (steps, V)."""
    engine = Engine(backend)
    recorders = [Recorder() for _ in prompts]
    handles, step = [], 0
    while len(handles) < len(prompts) or not all(h.ended.is_set() for h in handles):
        for _ in range(ARRIVALS.get(step, 0)):
            n = len(handles)
            config = GenerationConfig(max_new_tokens=6 + 3 * n, eos_token_ids=())
            handles.append(engine.submit(prompts[n], config, index=n, sampler=recorders[n]))
        engine.step()
        step += 1
    return [h.result().token_ids for h in handles], [np.stack(r.logits) for r in recorders]


def test_row_groups_give_every_request_the_tokens_and_logits_of_one_group(staged, whole):
    """G = 2 groups of the artifact's 2 rows (4 rows) against G = 1 and the whole artifact, with
    requests arriving while others run; control: a prompt the groups did not run differs."""
    prompts = random_prompts([5, 19, 11, 3, 9, 14, 6], vocab_size=128, seed=11)
    grouped, _ = open_step_backend(staged, "ort", row_groups=2)
    assert grouped.shapes.batch == 4 and grouped.stages.workers is not None
    try:
        tokens, logits = staggered(grouped, prompts)
    finally:
        grouped.close()
    for other in (open_step_backend(staged, "ort")[0], open_step_backend(whole, "ort")[0]):
        assert other.shapes.batch == 2
        their_tokens, their_logits = staggered(other, prompts)
        assert tokens == their_tokens
        for a, b in zip(logits, their_logits):
            assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5
    moved = staggered(open_step_backend(whole, "ort")[0], prompts[1:] + prompts[:1])[1]
    assert any(a.shape != b.shape or np.abs(a - b).max() > 1e-3 for a, b in zip(logits, moved))


def gate_stage_1(backend, wait: float, hold: int = 0, until: tuple[int, int] = (1, 1)) -> list[bool]:
    """Stage 1 holds its first run of group `hold` until stage 0 has started run n of group g
    (`until` = (g, n)), or `wait` s pass: only stages working on two groups at once get past it.
    Returns whether stage 0 got there."""
    first, second = backend.stages.backends
    started, held, runs = threading.Event(), [], {}
    run_first, run_second = first.run, second.run

    def stage_0(x, positions, group=0):
        runs[group] = runs.get(group, 0) + 1
        if (group, runs[group]) == until:
            started.set()
        return run_first(x, positions, group)

    def stage_1(x, positions, group=0):
        if group == hold and not held:
            held.append(started.wait(wait))
        return run_second(x, positions, group)

    first.run, second.run = stage_0, stage_1
    return held


def test_row_groups_are_in_flight_together(staged):
    """With 2 groups stage 0 runs group 1 while stage 1 still holds group 0; control: with one
    group (the same rows run one after the other) stage 0 never gets there."""
    for groups, wait, expected in ((2, 60.0, [True]), (1, 1.0, [False])):
        backend, _ = open_step_backend(staged, "ort", row_groups=groups)
        held = gate_stage_1(backend, wait)
        rows = backend.shapes.batch
        for _ in range(3 - groups):  # one group: the same 4 rows as two steps of 2, one after the other
            backend.step(np.full((rows, 1), 7, np.int64), np.zeros((rows, 1), np.int64))
        backend.close()
        assert held[:1] == expected, (groups, held)


def test_the_engine_keeps_groups_in_flight_across_steps(staged):
    """Stage 1 holds group 1's first step until stage 0 has started group 0's second: the engine
    lands group 0, samples it and starts its next step while group 1 is still in the stages.
    Control: the engine stepping all rows at once (both groups in one wave per step) never does."""
    prompts = random_prompts([3, 3, 3, 3], vocab_size=128, seed=13)
    for in_flight, wait, expected in ((True, 60.0, [True]), (False, 1.0, [False])):
        backend, _ = open_step_backend(staged, "ort", row_groups=2)
        held = gate_stage_1(backend, wait, hold=1, until=(0, 2))
        engine = Engine(backend)
        if not in_flight:
            engine.group_rows = None  # every step all rows: PipelineBackend.step's wave
        handles = [engine.submit(p, GenerationConfig(max_new_tokens=4, eos_token_ids=())) for p in prompts]
        events = list(engine.drive(handles))
        backend.close()
        assert held == expected, (in_flight, held)
        assert len(events) == 16


def test_an_idle_group_is_not_run_and_a_failed_group_fails_only_its_step(staged):
    backend, _ = open_step_backend(staged, "ort", row_groups=2)
    first, second = backend.stages.backends
    calls, run_second = [], second.run

    def failing(x, positions, group=0):
        calls.append(group)
        if len(calls) == 1:
            raise RuntimeError("stage 1 failed")
        return run_second(x, positions, group)

    second.run = failing
    ids, positions = np.full((4, 1), 7, np.int64), np.zeros((4, 1), np.int64)
    with pytest.raises(RuntimeError, match="stage 1 failed"):
        backend.step(ids, positions)
    positions[2:] = -1  # group 1 has no token: only group 0 runs
    backend.reset()
    assert backend.step(ids, positions).shape == (4, 1, 128)
    assert calls == [0, 1, 0]  # the workers outlived the failure; group 1 idle in the second step
    backend.close()


def test_row_groups_bad_input_is_one_line_exit_2(staged, whole):
    with pytest.raises(UsageError, match="row_groups must be a positive integer"):
        open_step_backend(staged, "ort", row_groups=0)
    with pytest.raises(RuntimeLoadError, match="--row-groups keeps groups of rows in flight"):
        open_step_backend(whole, "ort", row_groups=2)
    for art, extra, message in ((whole, ["--row-groups", "2"], "staged artifact"),
                                (staged, ["--row-groups", "0"], "--row-groups"),
                                (staged, ["--row-groups", "2", "--runtime", "eager"], "staged artifact on ort")):
        done = cli("generate", art, "--input-ids", "1,2,3", "--json", *extra)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert message in done.stderr, done.stderr
    done = cli("serve", whole, "--row-groups", "2", "--port", "0")  # refused before a server starts
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--row-groups run the stages of a staged artifact" in done.stderr
    done = cli("generate", staged, "--input-ids", "1,9,17,33,65,7", "--json", "--max-new-tokens", STEPS,
               "--row-groups", "2")  # control: the same flag on a staged artifact
    assert done.returncode == 0, done.stderr
