"""Attention over the span of the ring in use (artifact/contract.py spans, runtimes/span_ring.py).

A span-axis ONNX graph runs each step over the smallest span bucket that holds every row's positions;
the results are those of the whole ring, bit for bit (the masked slots add exp(min - max) = 0 to the
softmax and 0 * 0 to the output; measured exact on ONNX Runtime's CPU kernels, so the tests ask for
equality), and greedy generation equals transformers' across the span growth boundaries (64 -> 128
-> 256), with rows at different positions, and past a wrap of a sliding ring.

The eager, compiled and AOTI backends take the same spans: compiled and AOTI within 1e-4 of their own
whole ring and of eager (Inductor's kernels reduce over s + T slots, so not bit for bit), one compile
per chunk length, with controls (a span too short, a re-layout that loses the slots) that the
comparisons catch. TensorRT's profile choice is tested in tests/test_trt_manifest.py.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from mixtral_export.artifact.contract import MIN_SPAN, SPAN_STRIDE, StepShapes
from mixtral_export.graphs.onnx_export import export_onnx
from mixtral_export.runtimes.ort import OrtBackend
from mixtral_export.runtimes import span_ring
from tests.reference_models import hf_reference, random_prompts, reference_greedy

SLOTS = 256  # span buckets 64, 128, 256


def shapes(slots: int, span_axis: bool = True) -> StepShapes:
    return StepShapes(batch=2, prefill_chunk=8, cache_slots=slots, num_layers=2, num_kv_heads=2, head_dim=4,
                      vocab_size=10, dtype="float32", attention_window=None, span_axis=span_axis)


def test_span_buckets_are_powers_of_two_then_the_ring():
    assert shapes(256).span_buckets == (64, 128, 256)
    assert shapes(300).span_buckets == (64, 128, 256, 300)
    assert shapes(32).span_buckets == (32,)
    assert shapes(256, span_axis=False).span_buckets == (256,)  # an older graph: always the whole ring
    assert [shapes(256).span_for(n) for n in (0, 1, 64, 65, 128, 129, 256, 10_000)] == [64, 64, 64, 128, 128,
                                                                                         256, 256, 256]


def test_tight_spans_are_the_buckets_up_to_1024_slots_then_multiples_of_256():
    """ONNX Runtime and eager take any span: past 1024 slots they pass the next multiple of SPAN_STRIDE,
    not the next power of two (which would read up to twice the slots in use)."""
    ring = shapes(32768)
    assert [ring.tight_span(n) for n in (0, 64, 65, 1024)] == [ring.span_for(n) for n in (0, 64, 65, 1024)]
    assert [ring.tight_span(n) for n in (1025, 1280, 1281, 4097, 32768, 40_000)] == [
        1280, 1280, 1536, 4352, 32768, 32768]
    assert SPAN_STRIDE == 256 and shapes(3000).tight_span(2900) == 3000  # never past the ring
    assert shapes(32768, span_axis=False).tight_span(5) == 32768  # an older graph: always the whole ring


@pytest.mark.parametrize("ring", ["numpy", "torch"])
@pytest.mark.parametrize("old,new", [(64, 128), (128, 64), (64, 256)])
def test_relayout_keeps_every_blocks_slots_and_empties_the_new_ones(old, new, ring):
    """Both rings' re-layout (runtimes/span_ring.py in place on numpy, runtimes/torch_ring.py on torch)."""
    blocks, tail = 6, 3
    flat = np.arange(blocks * max(old, new) * tail, dtype=np.float32)
    before = flat[:blocks * old * tail].reshape(blocks, old, tail).copy()  # (blocks, old, tail)
    if ring == "numpy":
        span_ring.relayout(flat, blocks, old, new, tail, -7)
    else:
        import torch

        from mixtral_export.runtimes import torch_ring

        torch_ring.relayout(torch.from_numpy(flat), blocks, old, new, tail, -7)  # shares flat's memory
    after = flat[:blocks * new * tail].reshape(blocks, new, tail)  # (blocks, new, tail)
    keep = min(old, new)
    np.testing.assert_array_equal(after[:, :keep], before[:, :keep])
    assert (after[:, keep:] == -7).all()


@pytest.fixture(scope="module")
def no_window(tmp_path_factory):
    """A transformers checkpoint without a sliding window and its span-axis artifact (batch 2, 256 slots)."""
    folder = tmp_path_factory.mktemp("spans")
    model = hf_reference(folder / "ck", sliding_window=None, max_position_embeddings=1024)
    artifact = export_onnx(folder / "ck", folder / "onnx", batch=2, prefill_chunk=(4, 16), cache_slots=SLOTS)
    return model, artifact


def drive(backend: OrtBackend, prompts: list[list[int]], steps: int) -> tuple[list[np.ndarray], list[int]]:
    """Prefill each row's prompt (rows at different positions), then decode `steps` teacher-forced tokens
    per row; every step's logits at its real tokens (padding's are not defined) and the span it ran over."""
    rng = np.random.default_rng(5)
    logits, spans = [], []
    p = backend.shapes.prefill_chunk
    for row, prompt in enumerate(prompts):  # row by row: the other row sits the prefill out
        for start in range(0, len(prompt), p):
            piece = prompt[start:start + p]
            ids = np.zeros((2, p), np.int64)
            pos = np.full((2, p), -1, np.int64)
            ids[row, :len(piece)], pos[row, :len(piece)] = piece, np.arange(start, start + len(piece))
            logits.append(backend.step(ids, pos)[pos >= 0])  # (n, V)
            spans.append(backend.span)
    ends = [len(x) for x in prompts]
    for n in range(steps):
        ids = rng.integers(3, backend.shapes.vocab_size, (2, 1))
        pos = np.array([[ends[0] + n], [ends[1] + n]], np.int64)
        logits.append(backend.step(ids, pos))
        spans.append(backend.span)
    return logits, spans


def test_spans_equal_the_whole_ring_exactly_across_bucket_growth(no_window):
    model, artifact = no_window
    prompts = random_prompts([50, 9], model.config.vocab_size, seed=4)
    ours, spans = drive(OrtBackend(artifact), prompts, 90)  # row 0 reaches position 139
    full, full_spans = drive(OrtBackend(artifact, spans=False), prompts, 90)
    assert sorted(set(spans)) == [64, 128, 256] and set(full_spans) == {SLOTS}
    # prefill: row 0 in chunks of 16 (positions to 15, 31, 47, 49), then row 1 (to 8); decode feeds
    # 50, 51, ... to row 0: each step runs over the smallest bucket holding every position written so far,
    # growing at 64 and 128, never earlier
    extents = [16, 32, 48, 50, 50] + [51 + n for n in range(90)]
    assert spans == [64 if e <= 64 else 128 if e <= 128 else 256 for e in extents]
    for step, (a, b) in enumerate(zip(ours, full)):
        np.testing.assert_array_equal(a, b, err_msg=f"step {step} (span {spans[step]})")


def test_spans_past_1024_slots_grow_by_256_and_equal_the_whole_ring_exactly(tmp_path):
    """A 2048-slot ring, one row prefilled to 1290 positions: the spans step 1024 -> 1280 -> 1536 and
    every step's logits equal the whole ring's."""
    model = hf_reference(tmp_path / "ck", sliding_window=None, max_position_embeddings=2048)
    artifact = export_onnx(tmp_path / "ck", tmp_path / "onnx", batch=2, prefill_chunk=(4, 16), cache_slots=2048)
    prompts = random_prompts([1270, 5], model.config.vocab_size, seed=6)
    ours, spans = drive(OrtBackend(artifact), prompts, 20)  # row 0 reaches position 1289
    full, full_spans = drive(OrtBackend(artifact, spans=False), prompts, 20)
    assert set(full_spans) == {2048} and [s for s in sorted(set(spans)) if s >= 1024] == [1024, 1280, 1536]
    for step, (a, b) in enumerate(zip(ours, full)):
        np.testing.assert_array_equal(a, b, err_msg=f"step {step} (span {spans[step]})")


def test_control_a_relayout_that_loses_the_cache_is_caught(no_window, monkeypatch):
    """The comparison above sees a broken span: growing without keeping the old slots changes the logits."""
    model, artifact = no_window
    prompts = random_prompts([50, 9], model.config.vocab_size, seed=4)
    full, _ = drive(OrtBackend(artifact, spans=False), prompts, 20)

    def losing(flat, blocks, old, new, tail, fill):
        flat[:blocks * new * tail] = fill

    monkeypatch.setattr(span_ring, "relayout", losing)
    broken, spans = drive(OrtBackend(artifact), prompts, 20)
    grown = spans.index(128)
    assert any(not np.array_equal(a, b) for a, b in zip(broken[grown:], full[grown:]))


def test_greedy_generation_over_spans_equals_transformers(no_window):
    from mixtral_export.runtimes.generate import generate
    from mixtral_export.runtimes.requests import GenerationConfig
    from mixtral_export.runtimes.sampling import SamplingParams

    model, artifact = no_window
    prompts = random_prompts([37, 70], model.config.vocab_size, seed=6)
    steps = 70  # the longer row ends at position 139: spans 64, 128 and 256
    expected = reference_greedy(model, prompts, steps)
    backend = OrtBackend(artifact)
    config = GenerationConfig(max_new_tokens=steps, sampling=SamplingParams(), eos_token_ids=())
    result = generate(backend, prompts, config)
    assert [c.token_ids for c in result.completions] == expected
    assert backend.span == SLOTS and backend.ring.relayouts >= 2


def test_a_wrapped_sliding_ring_runs_whole_and_equals_the_whole_ring(tmp_path):
    """Window 32 in a 128-slot ring (buckets 64, 128): past position 128 slots are reused, so the span is S."""
    model = hf_reference(tmp_path / "ck", sliding_window=32, max_position_embeddings=1024)
    artifact = export_onnx(tmp_path / "ck", tmp_path / "onnx", batch=2, prefill_chunk=(4, 16), cache_slots=128)
    prompts = random_prompts([30, 12], model.config.vocab_size, seed=2)
    ours, spans = drive(OrtBackend(artifact), prompts, 130)
    full, _ = drive(OrtBackend(artifact, spans=False), prompts, 130)
    assert spans[0] == MIN_SPAN and spans[-1] == 128
    for a, b in zip(ours, full):
        np.testing.assert_array_equal(a, b)


def test_reset_rows_shrink_the_span_and_an_old_manifest_keeps_the_whole_ring(no_window, tmp_path):
    model, artifact = no_window
    backend = OrtBackend(artifact)
    prompts = random_prompts([50, 9], model.config.vocab_size, seed=4)
    drive(backend, prompts, 90)
    assert backend.span == 256
    backend.reset()
    backend.step(np.zeros((2, 4), np.int64), np.tile(np.arange(4), (2, 1)))
    assert backend.span == MIN_SPAN and (backend.cache_positions[:, 4:] == -1).all()

    old = tmp_path / "old"  # the same graph under a manifest written before the span axis existed
    old.mkdir()
    for item in artifact.iterdir():
        (old / item.name).symlink_to(item)
    manifest = json.loads((artifact / "manifest.json").read_text())
    del manifest["shapes"]["span_axis"]
    (old / "manifest.json").unlink()
    (old / "manifest.json").write_text(json.dumps(manifest))
    legacy = OrtBackend(old)
    assert not legacy.shapes.span_axis
    legacy.step(np.zeros((2, 4), np.int64), np.tile(np.arange(4), (2, 1)))
    assert legacy.span == SLOTS


@pytest.mark.parametrize("spans,expected", [(True, 128), (False, SLOTS)])
def test_health_and_metrics_show_the_span_in_use(no_window, spans, expected):
    """A 70-token prompt plus 5 tokens needs the 128 bucket; a backend told to keep the whole ring shows S."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mixtral_export.runtimes.session import Session
    from mixtral_export.serving.app import build_app

    model, artifact = no_window
    backend = OrtBackend(artifact, spans=spans)
    with Session(backend, backend.manifest) as session:
        session.generate_ids(random_prompts([70], model.config.vocab_size), max_new_tokens=5)
        http = TestClient(build_app(session.client, None, (), "m"))
        assert http.get("/health").json()["cache_span"] == expected
        assert f"mixtral_cache_span {float(expected)}" in http.get("/metrics").text


def test_eager_attends_over_spans_too_and_equals_its_whole_ring(no_window):
    """The eager backend (the parity reference of the other runtimes) takes the same spans, as views."""
    from mixtral_export.runtimes.eager import EagerBackend

    model, artifact = no_window
    prompts = random_prompts([50, 9], model.config.vocab_size, seed=4)
    eager = EagerBackend.from_checkpoint(artifact.parent / "ck", dict(batch=2, prefill_chunk=(4, 16), cache_slots=SLOTS))
    ours, spans = drive(eager, prompts, 90)
    full, full_spans = drive(EagerBackend(eager.model, eager.shapes, spans=False), prompts, 90)
    assert sorted(set(spans)) == [64, 128, 256] and set(full_spans) == {SLOTS}
    for step, (a, b) in enumerate(zip(ours, full)):
        np.testing.assert_array_equal(a, b, err_msg=f"step {step} (span {spans[step]})")


COMPILED_TOL = 1e-4  # fp32 logits, compiled against eager (tests/test_compiled.py's bound)


@pytest.fixture(scope="module")
def compiled_runs(no_window):
    """The compiled backend driven over spans and over the whole ring (the same symbolic graph: the second
    compiles from Inductor's cache), and eager over the whole ring; prefill chunk 16, so two compiles each."""
    from mixtral_export.checkpoint import load_model
    from mixtral_export.runtimes.compiled import CompiledBackend
    from mixtral_export.runtimes.eager import EagerBackend

    model, artifact = no_window
    folder = artifact.parent / "ck"
    eager = EagerBackend.from_checkpoint(folder, dict(batch=2, prefill_chunk=16, cache_slots=SLOTS))
    prompts = random_prompts([50, 9], model.config.vocab_size, seed=4)
    runs = {}
    for spans in (True, False):
        backend = CompiledBackend(load_model(folder), eager.shapes, spans=spans)
        runs[spans] = (backend, *drive(backend, prompts, 90))
    runs["eager"] = (eager, *drive(EagerBackend(eager.model, eager.shapes, spans=False), prompts, 90))
    return prompts, runs


def test_compiled_attends_over_spans_with_one_compile_per_chunk_length(compiled_runs):
    _, runs = compiled_runs
    backend, ours, spans = runs[True]
    whole, full, full_spans = runs[False]
    _, reference, _ = runs["eager"]
    extents = [16, 32, 48, 50, 50] + [51 + n for n in range(90)]  # as the ONNX test: grows at 64 and 128
    assert spans == [64 if e <= 64 else 128 if e <= 128 else 256 for e in extents]
    assert set(full_spans) == {SLOTS}  # the control: told to keep the whole ring, it does
    assert backend.compile_count == whole.compile_count == 2  # T = 16 and 1, whatever the span
    for step, (a, b, want) in enumerate(zip(ours, full, reference)):
        assert np.abs(a - b).max() <= COMPILED_TOL, f"step {step} (span {spans[step]})"
        assert np.abs(a - want).max() <= COMPILED_TOL, f"step {step} (span {spans[step]})"
        assert (a.argmax(-1) == want.argmax(-1)).all(), f"step {step}"


def test_control_a_compiled_span_too_short_changes_the_logits(compiled_runs):
    """The span reaches the graph: pinned to 64 slots, the steps past position 64 lose keys and differ."""
    prompts, runs = compiled_runs
    backend, ours, _ = runs[True]

    class Short:
        def span_for(self, extent: int) -> int:
            return MIN_SPAN

    buckets = backend.buckets
    backend.reset()
    backend.buckets = Short()
    try:
        short, spans = drive(backend, prompts, 20)
    finally:
        backend.buckets = buckets
    assert set(spans) == {MIN_SPAN} and backend.compile_count == 2
    past = 5 + 15  # row 0's decode step at position 65: the first whose keys include slot 64
    assert all(np.array_equal(a, b) for a, b in zip(short[:past - 1], ours[:past - 1]))  # both ran over 64
    assert max(np.abs(a - b).max() for a, b in zip(short[past:], ours[past:])) > 10 * COMPILED_TOL


@pytest.fixture(scope="module")
def aoti_spans(no_window):
    """The no-window checkpoint as an AOTI package with the span axis (batch 2, prefill chunk 16, 256 slots)."""
    from mixtral_export.graphs.aoti_export import export_aoti

    model, artifact = no_window
    return model, export_aoti(artifact.parent / "ck", artifact.parent / "aoti", batch=2, prefill_chunk=16,
                              cache_slots=SLOTS)


def test_aoti_attends_over_spans_and_equals_its_whole_ring_and_eager(aoti_spans, monkeypatch):
    """One package serves every span (a symbolic slot axis); the control re-lays the ring out without
    keeping its slots, and the comparison catches it."""
    from mixtral_export.runtimes import torch_ring
    from mixtral_export.runtimes.aoti import AotiBackend
    from mixtral_export.runtimes.eager import EagerBackend

    model, artifact = aoti_spans
    backend = AotiBackend(artifact)
    assert backend.shapes.span_axis and backend.shapes.span_buckets == (64, 128, 256)
    prompts = random_prompts([50, 9], model.config.vocab_size, seed=4)
    ours, spans = drive(backend, prompts, 90)
    full, full_spans = drive(AotiBackend(artifact, spans=False), prompts, 90)
    eager = EagerBackend.from_checkpoint(artifact.parent / "ck", dict(batch=2, prefill_chunk=16, cache_slots=SLOTS))
    reference, _ = drive(EagerBackend(eager.model, eager.shapes, spans=False), prompts, 90)
    extents = [16, 32, 48, 50, 50] + [51 + n for n in range(90)]
    assert spans == [64 if e <= 64 else 128 if e <= 128 else 256 for e in extents] and set(full_spans) == {SLOTS}
    assert backend.ring.relayouts == 2
    for step, (a, b, want) in enumerate(zip(ours, full, reference)):
        assert np.abs(a - b).max() <= COMPILED_TOL, f"step {step} (span {spans[step]})"
        assert np.abs(a - want).max() <= COMPILED_TOL, f"step {step} (span {spans[step]})"
        assert (a.argmax(-1) == want.argmax(-1)).all(), f"step {step}"

    def losing(flat, blocks, old, new, tail, fill):
        flat[:blocks * new * tail] = fill

    monkeypatch.setattr(torch_ring, "relayout", losing)
    broken, spans = drive(AotiBackend(artifact), prompts, 20)
    grown = spans.index(128)
    assert max(np.abs(a - b).max() for a, b in zip(broken[grown:], full[grown:])) > 10 * COMPILED_TOL


@pytest.mark.parametrize("runtime", ["compiled", "aoti"])
def test_health_shows_the_compiled_and_aoti_backends_span(no_window, aoti_spans, compiled_runs, runtime):
    """/health's cache_span is the span these backends' last step ran over (128 for 70 + 5 tokens), not S."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mixtral_export.runtimes.aoti import AotiBackend
    from mixtral_export.runtimes.session import Session
    from mixtral_export.serving.app import build_app

    model, artifact = aoti_spans
    aoti = AotiBackend(artifact)  # its manifest fits the compiled backend too: batch 2, chunk 16, 256 slots
    backend = aoti if runtime == "aoti" else compiled_runs[1][True][0]
    backend.reset()
    with Session(backend, aoti.manifest) as session:
        session.generate_ids(random_prompts([70], model.config.vocab_size), max_new_tokens=5)
        http = TestClient(build_app(session.client, None, (), "m"))
        assert http.get("/health").json()["cache_span"] == backend.span == 128
        assert "mixtral_cache_span 128.0" in http.get("/metrics").text
