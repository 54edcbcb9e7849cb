"""The same sequence scored under different build shapes gives the same logits (no transformers).

A prefill chunk of 1, 4, 8 or 16 tokens and a ring of the window's 32 slots or more only change how
the work is cut, never what is computed: every configuration must agree with every other within
float32 rounding (1e-5), across a prompt longer than the window and decode steps that wrap the ring.
"""
from __future__ import annotations

import numpy as np
import pytest

from mixtral_export.artifact.contract import StepShapes
from mixtral_export.checkpoint import load_model
from mixtral_export.artifact.config import MixtralConfig
from mixtral_export.runtimes.eager import EagerBackend
from mixtral_export.runtimes.ort import OrtBackend
from mixtral_export.runtimes.verify import teacher_forced

TOL = 1e-5
SHAPES = [(8, 32), (1, 32), (4, 48), (16, 64), (16, 32)]  # (prefill_chunk, cache_slots)


@pytest.fixture(scope="module")
def sequences(tiny_checkpoint) -> tuple[list[list[int]], list[list[int]]]:
    vocab = MixtralConfig.from_json(tiny_checkpoint).vocab_size
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, vocab, 45).tolist(), rng.integers(3, vocab, 6).tolist()]  # longer than W=32, short
    forced = [rng.integers(3, vocab, 40).tolist() for _ in prompts]  # positions reach 85: the ring wraps
    return prompts, forced


def scored(backend, sequences) -> list[np.ndarray]:
    return teacher_forced(backend, *sequences)  # per prompt (steps, V)


def eager(checkpoint, prefill_chunk: int, cache_slots: int) -> EagerBackend:
    config = MixtralConfig.from_json(checkpoint)
    shapes = StepShapes.for_config(config, batch=2, prefill_chunk=prefill_chunk, cache_slots=cache_slots)
    return EagerBackend(load_model(checkpoint, attention_window=shapes.attention_window), shapes)


def test_prefill_chunk_and_ring_size_do_not_change_the_logits(tiny_checkpoint, sequences):
    runs = {shape: scored(eager(tiny_checkpoint, *shape), sequences) for shape in SHAPES}
    first = runs[SHAPES[0]]
    for shape, logits in runs.items():
        for row, (a, b) in enumerate(zip(logits, first)):
            diff = float(np.abs(a - b).max())
            assert diff <= TOL, f"prefill_chunk, cache_slots = {shape}, prompt {row}: max |logit diff| {diff:.1e}"


def test_onnx_runtime_agrees_with_eager_of_other_shapes(tiny_onnx, tiny_checkpoint, sequences):
    ort = scored(OrtBackend(tiny_onnx), sequences)  # prefill chunk 8, 32 slots
    other = scored(eager(tiny_checkpoint, 16, 64), sequences)
    for row, (a, b) in enumerate(zip(ort, other)):
        assert float(np.abs(a - b).max()) <= 1e-4, row  # across runtimes: the fp32 verify tolerance


def test_a_wrong_window_would_be_caught(tiny_checkpoint, sequences):
    """The comparison can fail: attending to 16 positions instead of 32 changes the long prompt's logits."""
    config = MixtralConfig.from_json(tiny_checkpoint)
    shapes = StepShapes.for_config(config, batch=2, prefill_chunk=8, cache_slots=16, slide=True)
    narrow = EagerBackend(load_model(tiny_checkpoint, attention_window=shapes.attention_window), shapes)
    assert float(np.abs(scored(narrow, sequences)[0] - scored(eager(tiny_checkpoint, 8, 32), sequences)[0]).max()) > 1e-2
