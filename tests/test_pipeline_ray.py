"""Pipeline stages as Ray actors: the same tokens and logits as in one process (one group of rows or
two in flight), torch-free actors, a stage actor that dies, and `generate --ray` starting its own
local cluster.

The module shares one local Ray cluster (started by runtimes/ray_stages.py as the CLI starts it).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("ray")

from mixtral_export.graphs.onnx_export import export_onnx  # noqa: E402
from mixtral_export.runtimes.load import open_step_backend  # noqa: E402
from mixtral_export.runtimes.ray_stages import StageFailed, start_ray  # noqa: E402
from mixtral_export.runtimes.session import Session  # noqa: E402
from mixtral_export.runtimes.verify import teacher_forced  # noqa: E402
from tests.reference_models import hf_reference, random_prompts, reference_greedy  # noqa: E402
from tests.test_pipeline import assert_serves_as_the_whole, staggered  # noqa: E402

SHAPES = dict(dtype="float32", batch=2, prefill_chunk=8, cache_slots=8)
STEPS = 16


@pytest.fixture(scope="module")
def cluster():
    started = start_ray()
    import ray

    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline-ray") / "checkpoint"
    return folder, hf_reference(folder, seed=7, num_hidden_layers=3)


@pytest.fixture(scope="module")
def staged(reference, tmp_path_factory):
    return export_onnx(reference[0], tmp_path_factory.mktemp("staged") / "art", stages=3, **SHAPES)


def test_ray_stages_give_the_in_process_tokens_and_logits(cluster, reference, staged):
    prompts = random_prompts([5, 14, 9], vocab_size=128, seed=8)  # 3 prompts on 2 rows
    local, _ = open_step_backend(staged, "ort")
    with Session.open(staged, ray=True) as session:
        stages = session.backend.stages
        assert len(stages.actors) == 3 and not any(p["torch"] for p in stages.processes)  # ORT only in the actors
        assert len({p["pid"] for p in stages.processes} | {os.getpid()}) == 4  # each stage its own process
        tokens = [c.token_ids for c in session.generate_ids(prompts, max_new_tokens=STEPS).completions]
        assert tokens == reference_greedy(reference[1], prompts, STEPS)
        ours = teacher_forced(session.backend, prompts, tokens)
    for a, b in zip(ours, teacher_forced(local, prompts, tokens)):
        np.testing.assert_array_equal(a, b)  # the same graphs on the same inputs, only hosted elsewhere


def test_a_dead_stage_ends_its_requests_and_the_pipeline_comes_back(cluster, staged):
    prompt = random_prompts([6], vocab_size=128, seed=9)[0]
    with Session.open(staged, ray=True) as session:
        expected = session.generate_ids([prompt], max_new_tokens=STEPS).completions[0].token_ids
        handle = session.submit(prompt, max_new_tokens=100_000)  # runs until the stage dies
        next(iter(handle))  # it is decoding
        os.kill(session.backend.stages.processes[1]["pid"], signal.SIGKILL)
        with pytest.raises(StageFailed, match="stage 1.s actor died"):
            deadline = time.monotonic() + 120
            for _ in handle:
                assert time.monotonic() < deadline
            handle.result()
        again = session.generate_ids([prompt, prompt], max_new_tokens=STEPS)  # the actor restarted
        assert [c.token_ids for c in again.completions] == [expected, expected]


def test_cli_generate_ray_starts_its_own_cluster(staged):
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = [sys.executable, "-m", "mixtral_export", "generate", str(staged), "--input-ids", "3,9,27,81",
            "--json", "--max-new-tokens", str(STEPS)]
    runs = [subprocess.run(args + extra, capture_output=True, text=True, timeout=300, env=environ)
            for extra in ([], ["--ray"])]
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    tokens = [json.loads(r.stdout)["completions"][0]["token_ids"] for r in runs]
    assert tokens[0] == tokens[1] and tokens[0]  # may end early, at the checkpoint's EOS


def test_serve_with_stage_actors(tiny_checkpoint, tiny_onnx, tmp_path):
    """Stage actors placed by a --stage-options file, two groups of rows in flight."""
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from tests.test_serve import Server

    art = export_onnx(tiny_checkpoint, tmp_path / "art", dtype="float32", batch=2, prefill_chunk=8, cache_slots=32,
                      stages=2)
    (tmp_path / "stages.json").write_text(json.dumps({"num_cpus": 0}))
    server = Server(art, "--stage-actors", "--row-groups", "2", "--stage-options", str(tmp_path / "stages.json"),
                    env={"RAY_ADDRESS": ""})  # its own local cluster
    assert_serves_as_the_whole(server, tiny_onnx, ("Simple is better", "Flat is better than nested"))


def test_ray_stages_of_a_tied_model(cluster, tmp_path):
    """The last stage's actor looks the ids up in its tied table, then stage 0 runs."""
    model = hf_reference(tmp_path / "checkpoint", seed=5, num_hidden_layers=2, tie_word_embeddings=True)
    art = export_onnx(tmp_path / "checkpoint", tmp_path / "art", stages=2, **SHAPES)
    prompts = random_prompts([5, 11], vocab_size=128, seed=10)
    with Session.open(art, ray=True) as session:
        assert session.backend.stages.tied
        tokens = [c.token_ids for c in session.generate_ids(prompts, max_new_tokens=STEPS).completions]
    assert tokens == reference_greedy(model, prompts, STEPS)


def test_ray_row_groups_give_the_tokens_and_logits_of_one_group_in_process(cluster, reference, staged):
    """Two groups of the artifact's 2 rows on the stage actors, requests arriving while others run,
    against one group in this process."""
    prompts = random_prompts([5, 19, 11, 3, 9, 14, 6], vocab_size=128, seed=12)
    with Session.open(staged, ray=True, row_groups=2) as session:
        assert session.backend.shapes.batch == 4
        tokens, logits = staggered(session.backend, prompts)
    local_tokens, local_logits = staggered(open_step_backend(staged, "ort")[0], prompts)
    assert tokens == local_tokens
    longest = max(map(len, tokens))
    assert tokens == [r[:len(t)] for r, t in zip(reference_greedy(reference[1], prompts, longest), tokens)]
    for a, b in zip(logits, local_logits):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5


def overlapped_steps(session, steps: int) -> int:
    """Decode steps (every row live) in which stage 0 started group 1 before stage 1 ended group 0,
    by the actors' own clocks."""
    backend = session.backend
    rows = backend.shapes.batch
    backend.reset()
    backend.stages.runs()  # forget the earlier runs
    count = 0
    for step in range(steps):
        backend.step(np.full((rows, 1), 7, np.int64), np.full((rows, 1), step, np.int64))
        first, second = backend.stages.runs()[:2]
        starts = {group: start for group, start, _ in first}
        ends = {group: end for group, _, end in second}
        count += 1 in starts and starts[1] < ends[0]
    return count


def test_ray_row_groups_are_in_flight_together(cluster, staged):
    """Every group's calls are submitted before the step waits, so stage 0 runs group 1 while stage 1
    runs group 0; control: one group at a time (G = 1, two steps for the same rows) never does."""
    with Session.open(staged, ray=True, row_groups=2) as session:
        assert overlapped_steps(session, 5) >= 1
    with Session.open(staged, ray=True) as session:
        assert overlapped_steps(session, 5) == 0


def test_stage_options_place_each_stage_and_bad_ones_are_one_line(cluster, staged, tmp_path):
    """A JSON file of per-stage Ray options reaches each stage's actor (stage 1 holds a CPU, the
    others none, the default); a bad file is refused in one line (exit 2)."""
    from mixtral_export.errors import UsageError
    from mixtral_export.runtimes.ray_stages import read_stage_options

    path = tmp_path / "stages.json"
    path.write_text(json.dumps([{}, {"num_cpus": 1}, {}]))
    with Session.open(staged, ray=True, stage_options=read_stage_options(path)) as session:
        held = [p["resources"].get("CPU", 0) for p in session.backend.stages.processes]
    assert held == [0, 1, 0]
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for text, message in (("[{}, {}]", "3 stages, but 2 stage options"), ('{"gpus": 1}', "unknown stage option 'gpus'"),
                          ("[1, 2, 3]", "one object or a list"), ("{", "not JSON")):
        path.write_text(text)
        done = subprocess.run([sys.executable, "-m", "mixtral_export", "generate", str(staged), "--input-ids", "3,9",
                               "--ray", "--stage-options", str(path)], capture_output=True, text=True, timeout=300,
                              env=environ)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
        assert message in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "-m", "mixtral_export", "generate", str(staged), "--input-ids", "3,9",
                           "--stage-options", str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--stage-options needs --ray" in done.stderr
