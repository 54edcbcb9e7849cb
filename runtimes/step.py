"""The one narrow interface every backend implements, and the ring-cache bookkeeping they share."""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from mixtral_export.artifact.contract import NO_POSITION, StepShapes
from mixtral_export.errors import UserError


class RequestError(UserError, ValueError):
    """A generation request that cannot be served as asked (bad ids, options, lengths)."""


class ContextOverflow(RequestError):
    """A position the artifact's cache cannot serve."""


class StepBackend(Protocol):
    """Runs one chunk of a static-shape Mixtral and keeps its own rolling KV cache.

    `step` takes (B, T) int64 token ids and positions with T in shapes.chunks (a prefill chunk or 1),
    positions -1 marking "no token" (padding); returns float32 logits (B, T, V) as numpy and
    writes the chunk's keys/values into ring slots position % S. A backend is not thread-safe:
    one generation at a time per backend instance.
    """

    shapes: StepShapes
    name: str

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Empty the cache of `rows` (every row when None): a row's next occupant sees nothing of it."""
        ...

    def step(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        ...


class GroupedStepBackend(StepBackend, Protocol):
    """A StepBackend whose B rows are `groups` groups of `group_rows`, row r in group r // group_rows,
    whose groups' steps can be in flight together (a pipeline's stages each working on another group,
    runtimes/pipeline.py). The engine (runtimes/engine.py) uses it when `groups` > 1."""

    groups: int
    group_rows: int

    def start_group(self, group: int, input_ids: np.ndarray, positions: np.ndarray) -> object:
        """Start one group's step, its ids and positions (group_rows, T), without waiting: a ticket."""
        ...

    def finish_group(self, ticket: object) -> np.ndarray:
        """Wait for a started step: its group's logits (group_rows, T, V); steps finish in the order started."""
        ...


def check_step_inputs(shapes: StepShapes, vocab_size: int, input_ids: np.ndarray,
                      positions: np.ndarray) -> None:
    """Validate a step's inputs before they reach a graph (graphs do not bounds-check)."""
    if input_ids.shape != positions.shape or input_ids.ndim != 2:
        raise RequestError(f"input_ids {input_ids.shape} and positions {positions.shape} must both be (B, T)")
    batch, chunk = input_ids.shape
    if batch != shapes.batch or chunk not in shapes.chunks:
        raise RequestError(f"step shape (B={batch}, T={chunk}) does not match the artifact "
                         f"(B={shapes.batch}, T={', '.join(map(str, shapes.prefill_chunks))} or 1)")
    live = positions != NO_POSITION
    if np.any(positions[live] < 0):
        raise RequestError("positions must be >= 0 or -1 for padding")
    if np.any((input_ids < 0) | (input_ids >= vocab_size)):
        bad = int(input_ids[(input_ids < 0) | (input_ids >= vocab_size)][0])
        raise RequestError(f"token id {bad} is out of range for a vocabulary of {vocab_size}")
    limit = shapes.max_positions
    if limit is not None and live.any() and int(positions[live].max()) >= limit:
        raise ContextOverflow(f"position {int(positions[live].max())} does not fit the cache of "
                              f"{limit} slots (model without sliding window; rebuild with more "
                              f"--cache-slots or opt in to --slide)")


def ring_writes(positions: np.ndarray, cache_slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where a chunk's keys/values go: (rows, chunk columns, slots), only for real tokens.

    If a chunk were longer than the ring, later tokens would win; the contract forbids that.
    """
    rows, cols = np.nonzero(positions != NO_POSITION)
    slots = positions[rows, cols] % cache_slots
    return rows, cols, slots
