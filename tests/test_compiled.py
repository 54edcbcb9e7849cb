"""The torch.compile backend matches eager step for step, and compiles once per chunk length.

One session-wide run of the shared lock-step script (runtimes/step_parity.py): a left-padded batch
of two rows, two prefill chunks each followed by 24 greedy decode steps (the second row sits some
out, so decode padding is exercised too) through the tiny model's 32-slot ring: positions reach
80, so the ring wraps twice. Both backends are fed the eager run's tokens; fp32 logits must agree
within 1e-4 and give the same argmax.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from mixtral_export.artifact.contract import NO_POSITION, StepShapes
from mixtral_export.artifact.config import MixtralConfig
from mixtral_export.runtimes.step_parity import lockstep

TOL = 1e-4
PREFILL = 16
DECODE_STEPS = 24  # per prefill chunk: 2 x (16 + 24) = 80 positions


@dataclass
class Run:
    backend: object  # the CompiledBackend
    worst: float  # max |logit diff| over every real token
    argmax_equal: bool
    last_position: int
    compile_count_after_warmup: int


def prompts(batch: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, P) ids and positions: row 0 fills the chunk, row 1 is left-padded by 5."""
    ids = np.random.default_rng(0).integers(3, vocab, size=(batch, PREFILL))
    positions = np.tile(np.arange(PREFILL), (batch, 1))
    positions[1, :5] = NO_POSITION
    positions[1, 5:] = np.arange(PREFILL - 5)
    return ids, positions


@pytest.fixture(scope="session")
def compiled_run(tiny_checkpoint) -> Run:
    from mixtral_export.checkpoint import load_model
    from mixtral_export.runtimes.compiled import CompiledBackend
    from mixtral_export.runtimes.eager import EagerBackend

    config = MixtralConfig.from_json(tiny_checkpoint)
    shapes = StepShapes.for_config(config, batch=2, prefill_chunk=PREFILL, cache_slots=32)
    eager = EagerBackend(load_model(tiny_checkpoint, attention_window=shapes.attention_window), shapes)
    compiled = CompiledBackend(load_model(tiny_checkpoint, attention_window=shapes.attention_window), shapes)
    compiled.warmup()
    after_warmup = compiled.compile_count
    (parity,) = lockstep(eager, [compiled], decode_steps=DECODE_STEPS)
    return Run(compiled, parity.max_abs, parity.top1_agreement == 1.0, parity.last_position, after_warmup)


def test_greedy_decode_matches_eager_across_two_ring_wraps(compiled_run):
    assert compiled_run.last_position >= 2 * compiled_run.backend.shapes.cache_slots
    assert compiled_run.worst <= TOL, f"max |logit diff| {compiled_run.worst:.2e} > {TOL}"
    assert compiled_run.argmax_equal


def test_compiles_once_per_chunk_length_and_never_during_generation(compiled_run):
    backend = compiled_run.backend
    assert compiled_run.compile_count_after_warmup == 2
    assert backend.compile_count == 2
    assert set(backend.compile_seconds) == {PREFILL, 1}
    assert backend.run_steps > DECODE_STEPS and backend.run_seconds > 0


def test_reset_empties_the_ring(compiled_run):
    backend = compiled_run.backend
    ids, positions = prompts(backend.shapes.batch, backend.shapes.vocab_size)
    backend.reset()
    first = backend.step(ids, positions)
    backend.step(ids[:, :1], positions[:, -1:] + 1)
    backend.reset()
    np.testing.assert_array_equal(backend.step(ids, positions), first)
    assert backend.compile_count == 2


def test_rejects_a_chunk_length_it_was_not_built_for(compiled_run):
    backend = compiled_run.backend
    with pytest.raises(ValueError, match="does not match the artifact"):
        backend.step(np.zeros((2, 3), dtype=np.int64), np.zeros((2, 3), dtype=np.int64))
    assert backend.compile_count == 2


def test_a_third_compile_is_an_error_not_a_silent_slowdown(compiled_run):
    import torch

    backend = compiled_run.backend
    b, s = backend.shapes.batch, backend.shapes.cache_slots
    padding = torch.stack((torch.zeros(b, 4, dtype=torch.int64), torch.full((b, 4), NO_POSITION),
                           torch.full((b, 4), s)))  # (3, B, T=4): ids, positions, dummy slots
    with torch.no_grad(), pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
        backend.compiled(padding, backend.markers[backend.span])
    assert backend.compile_count == 2


@pytest.mark.slow  # three CPU compiles (T = 16, 4, 1)
def test_a_list_of_prefill_chunks_compiles_each_once_and_matches_eager(tiny_checkpoint):
    from mixtral_export.checkpoint import load_model
    from mixtral_export.runtimes.compiled import CompiledBackend
    from mixtral_export.runtimes.eager import EagerBackend

    config = MixtralConfig.from_json(tiny_checkpoint)
    shapes = StepShapes.for_config(config, batch=2, prefill_chunk=(4, PREFILL), cache_slots=32)
    eager = EagerBackend(load_model(tiny_checkpoint, attention_window=shapes.attention_window), shapes)
    compiled = CompiledBackend(load_model(tiny_checkpoint, attention_window=shapes.attention_window), shapes)
    compiled.warmup()
    assert compiled.compile_count == 3 and set(compiled.compile_seconds) == {PREFILL, 4, 1}
    ids, positions = prompts(shapes.batch, shapes.vocab_size)
    steps = [(ids[:, :4], positions[:, :4]), (ids[:, 4:8], positions[:, 4:8]), (ids[:, 8:], positions[:, 8:]),
             (ids[:, :1], positions[:, -1:] + 1)]  # T = 4, 4, 8 (not served: refused), then 1
    for n, (step_ids, step_positions) in enumerate(steps):
        if step_ids.shape[1] not in shapes.chunks:
            with pytest.raises(ValueError, match="T=4, 16 or 1"):
                compiled.step(step_ids, step_positions)
            continue
        want, got = eager.step(step_ids, step_positions), compiled.step(step_ids, step_positions)
        real = step_positions != NO_POSITION
        assert np.abs(want[real] - got[real]).max() <= TOL, n
    assert compiled.compile_count == 3
