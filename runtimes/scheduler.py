"""The engine's scheduling policy as one pure function: from the requests in the batch rows and in
the queue, the plan of the next step. Nothing here runs a backend or changes a request.

A plan first retires the cancelled and expired requests (queued or in a row), then admits queued
requests in arrival order to the free rows below `max_rows` (the lowest row first), then feeds every
busy row: a row still prefilling its next piece of up to T prompt tokens (columns 0..n-1, the rest
NO_POSITION), a decoding row its last token. T is the shortest prefill chunk that holds the longest
prompt piece left when any row prefills, else 1. With `ride_along` a decoding row joins a prefill
step with its one token in column 0 (static shapes compute every column anyway); without it,
decoders sit that step out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mixtral_export.artifact.contract import NO_POSITION, StepShapes
from mixtral_export.runtimes.requests import FinishReason, RequestState


@dataclass(frozen=True, eq=False)
class StepPlan:
    """One step, decided: what to retire, whom to admit where, and what each batch row is fed."""

    retired: tuple[tuple[RequestState, FinishReason], ...]  # ended before the step, queued or in a row
    admitted: tuple[tuple[int, RequestState], ...]  # (batch row, request) taken from the queue, in its order
    running: tuple[tuple[int, RequestState], ...]  # (batch row, request) fed this step, by row
    input_ids: np.ndarray  # (B, T)
    positions: np.ndarray  # (B, T); NO_POSITION where nothing is fed
    fed: tuple[tuple[int, int], ...]  # (batch row, prompt tokens it feeds this step) for prefilling rows
    sample_at: tuple[tuple[int, int], ...]  # (batch row, column of its next-token logits), by row

    @property
    def prefill(self) -> bool:
        return bool(self.fed)

    @property
    def length(self) -> int:
        """T, the chunk length of the step."""
        return self.input_ids.shape[1]


def plan_step(rows: Sequence[RequestState | None], waiting: Sequence[RequestState], shapes: StepShapes,
              max_rows: int, ride_along: bool, now: float, first_row: int = 0) -> StepPlan:
    """The next step's plan; `rows` holds each batch row's request (None = free), `waiting` the queue.
    `rows` may be a group of the batch, rows first_row, first_row + 1, ...: the plan names those rows,
    its input_ids and positions are the group's (len(rows), T), `max_rows` counts within it."""
    retired = tuple((r, reason) for r in [*waiting, *filter(None, rows)] if (reason := ending(r, now)))
    gone = {id(r) for r, _ in retired}
    occupants = [None if r is None or id(r) in gone else r for r in rows]
    queue = [r for r in waiting if id(r) not in gone]
    admitted = []
    for row in range(max_rows):
        if occupants[row] is None and queue:
            occupants[row] = queue.pop(0)
            admitted.append((row, occupants[row]))
    running = [(row, r) for row, r in enumerate(occupants) if r is not None]
    prefill = any(r.prefilling for _, r in running)
    if prefill and not ride_along:
        running = [(row, r) for row, r in running if r.prefilling]
    length = shapes.prefill_length(max(len(r.prompt) - r.fed for _, r in running if r.prefilling)) if prefill else 1
    input_ids = np.zeros((len(rows), length), dtype=np.int64)  # (B, T)
    positions = np.full((len(rows), length), NO_POSITION, dtype=np.int64)  # (B, T)
    fed, sample_at = [], []
    for row, r in running:
        if r.prefilling:
            piece = r.prompt[r.fed:r.fed + length]
            input_ids[row, :len(piece)] = piece
            positions[row, :len(piece)] = np.arange(r.fed, r.fed + len(piece))
            fed.append((row, len(piece)))
            if r.fed + len(piece) == len(r.prompt):  # the prompt's last token: its logits give the first new one
                sample_at.append((row, len(piece) - 1))
        else:
            input_ids[row, 0] = r.ids[-1]
            positions[row, 0] = len(r.ids) - 1
            sample_at.append((row, 0))
    if first_row:
        admitted, running = [(first_row + row, r) for row, r in admitted], [(first_row + row, r) for row, r in running]
        fed, sample_at = [(first_row + row, n) for row, n in fed], [(first_row + row, c) for row, c in sample_at]
    return StepPlan(retired, tuple(admitted), tuple(running), input_ids, positions, tuple(fed), tuple(sample_at))


def ending(request: RequestState, now: float) -> FinishReason | None:
    """Why a request ends before the next step (cancelled, past its deadline), or None."""
    if request.cancelled:
        return "cancelled"
    if request.deadline is not None and now >= request.deadline:
        return "timeout"
    return None
