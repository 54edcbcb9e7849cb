"""The one step-level comparator: backends driven in lock step, logits compared at every real token.

Every backend takes the same script with the tokens the reference picks greedily: row r starts 3r
positions later (left padding, position -1), rows after the first sit out every 7th decode step,
and prefill chunks each lead `decode_steps` decode steps: the longest first, then every other length
the graph takes (at least two prefills), so later chunks are prefilled mid-sequence at each length and,
for the tiny model, positions run past its ring more than twice. Differences
count real tokens only (what a padding row computes is not part of the contract). Every backend's
tests and scripts/gpu_check.py measure with this; runtimes/verify.py compares whole generations.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mixtral_export.artifact.contract import NO_POSITION
from mixtral_export.runtimes.step import StepBackend


@dataclass
class StepParity:
    """One backend against the reference over the whole script."""

    per_step_max_abs: list[float] = field(default_factory=list)  # max |logit diff| over real tokens
    agree: int = 0  # real tokens whose argmax agrees
    tokens: int = 0  # real tokens compared
    last_position: int = NO_POSITION  # the highest position fed

    @property
    def max_abs(self) -> float:
        return max(self.per_step_max_abs, default=0.0)

    @property
    def worst_step(self) -> int:
        return int(np.argmax(self.per_step_max_abs))

    @property
    def top1_agreement(self) -> float:
        return self.agree / self.tokens if self.tokens else 1.0

    def add(self, ours: np.ndarray, theirs: np.ndarray, positions: np.ndarray) -> None:
        live = positions != NO_POSITION  # (B, T)
        diff = np.abs(ours.astype(np.float64) - theirs)[live]  # (n, V)
        self.per_step_max_abs.append(float(diff.max()) if diff.size else 0.0)
        self.agree += int((ours.argmax(-1) == theirs.argmax(-1))[live].sum())
        self.tokens += int(live.sum())
        self.last_position = max(self.last_position, int(positions.max()))


def lockstep(reference: StepBackend, others: list[StepBackend], decode_steps: int = 32,
             seed: int = 0) -> list[StepParity]:
    """Run the script on every backend (each reset first); one StepParity per backend in `others`."""
    shapes = reference.shapes
    batch = shapes.batch
    others_lengths = [t for t in shapes.prefill_chunks if t != shapes.prefill_chunk]
    chunk_plan = [shapes.prefill_chunk, *(others_lengths or [shapes.prefill_chunk])]  # each length at least once
    rng = np.random.default_rng(seed)
    results = [StepParity() for _ in others]
    next_position = -3 * np.arange(batch)  # (B,) row r lags 3r behind row 0
    for backend in (reference, *others):
        backend.reset()

    def step(ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        logits = reference.step(ids, positions)  # (B, T, V)
        for result, backend in zip(results, others):
            result.add(backend.step(ids, positions), logits, positions)
        return logits

    for chunk in chunk_plan:
        positions = next_position[:, None] + np.arange(chunk)  # (B, P)
        positions[positions < 0] = NO_POSITION
        next_position = next_position + chunk
        logits = step(rng.integers(0, shapes.vocab_size, (batch, chunk)), positions)
        for i in range(decode_steps):
            positions = next_position[:, None].copy()  # (B, 1)
            if i % 7 == 3:
                positions[1:] = NO_POSITION  # every row but the first sits this step out
            next_position = next_position + (positions[:, 0] != NO_POSITION)
            logits = step(logits[:, -1].argmax(-1)[:, None], positions)  # the reference's greedy tokens
    return results
