"""The head graphs' one narrow interface, and the one loop that runs prompts through it.

A head backend runs a static (B, T) batch: `run(input_ids, attention_mask) -> {output name: array}`
(graphs/contract.py, HeadShapes). `score` pads prompts into such batches (left or right), runs
them B rows at a time and cuts each row's outputs back to its own tokens, so every caller (HeadSession,
the CLI, verify) pads and unpads the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from mixtral_export.artifact.contract import HEAD_INPUT_NAMES, HeadShapes
from mixtral_export.runtimes.step import RequestError

PADDING_SIDES = ("left", "right")


class HeadBackend(Protocol):
    """Runs a static-shape head graph; no cache, no state between calls."""

    shapes: HeadShapes
    name: str

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        """(B, T) int64 ids and mask (1 = token) -> float32 outputs named as the contract names them."""
        ...


@dataclass
class HeadResult:
    """One prompt's outputs: per-token outputs cut to its n tokens ((n, ...)), pooled ones as they are."""

    token_ids: list[int]
    outputs: dict[str, np.ndarray]

    def to_json(self, head: str, labels: Sequence[str]) -> dict:
        """The outputs as JSON, with label names (classification) or the best start/end (QA) added."""
        out: dict = {"token_ids": self.token_ids}
        if head == "sequence-classification":
            logits = self.outputs["logits"]  # (N,)
            out.update(label=labels[int(logits.argmax())], logits=dict(zip(labels, logits.tolist())))
        elif head == "token-classification":
            logits = self.outputs["logits"]  # (n, N)
            out.update(labels=[labels[i] for i in logits.argmax(-1)], logits=logits.tolist())
        elif head == "question-answering":
            start, end = self.outputs["start_logits"], self.outputs["end_logits"]  # (n,) each
            first = int(start.argmax())
            out.update(start=first, end=first + int(end[first:].argmax()), start_logits=start.tolist(),
                       end_logits=end.tolist())
        else:
            out.update(last_hidden_state=self.outputs["last_hidden_state"].tolist())  # (n, H)
        return out


def check_head_inputs(shapes: HeadShapes, vocab_size: int, input_ids: np.ndarray, attention_mask: np.ndarray) -> None:
    """Validate a batch before it reaches a graph (graphs do not bounds-check)."""
    want = (shapes.batch, shapes.seq_len)
    for name, array in zip(HEAD_INPUT_NAMES, (input_ids, attention_mask)):
        if array.shape != want:
            raise RequestError(f"{name} has shape {tuple(array.shape)}, the artifact takes (B, T) = {want}")
    if np.any((input_ids < 0) | (input_ids >= vocab_size)):
        bad = int(input_ids[(input_ids < 0) | (input_ids >= vocab_size)][0])
        raise RequestError(f"token id {bad} is out of range for a vocabulary of {vocab_size}")
    if np.any((attention_mask != 0) & (attention_mask != 1)):
        raise RequestError("attention_mask must hold only 0 (padding) and 1 (token)")


def padded_batch(prompts: Sequence[Sequence[int]], shapes: HeadShapes, pad_token_id: int | None,
                 side: str) -> tuple[np.ndarray, np.ndarray]:
    """ids and mask (B, T) for up to B prompts, padded on `side` with pad_token_id (0 without one);
    rows past the prompts are all padding."""
    if side not in PADDING_SIDES:
        raise RequestError(f"padding {side!r} is not one of {', '.join(PADDING_SIDES)}")
    ids = np.full((shapes.batch, shapes.seq_len), pad_token_id or 0, dtype=np.int64)  # (B, T)
    mask = np.zeros((shapes.batch, shapes.seq_len), dtype=np.int64)  # (B, T)
    for row, prompt in enumerate(prompts):
        columns = slice(shapes.seq_len - len(prompt), None) if side == "left" else slice(0, len(prompt))
        ids[row, columns], mask[row, columns] = prompt, 1
    return ids, mask


def score(backend: HeadBackend, prompts: Sequence[Sequence[int]], pad_token_id: int | None,
          side: str = "left") -> list[HeadResult]:
    """Every prompt's outputs, the prompts run B rows at a time, padded on `side`."""
    shapes = backend.shapes
    prompts = [list(p) for p in prompts]
    for n, prompt in enumerate(prompts):
        if not prompt:
            raise RequestError(f"prompt {n} is empty")
        if len(prompt) > shapes.seq_len:
            raise RequestError(f"prompt {n} has {len(prompt)} tokens; the artifact takes at most {shapes.seq_len} "
                               f"(export with a larger --seq-len)")
        if (shapes.head == "sequence-classification" and pad_token_id is None and side == "right"
                and len(prompt) < shapes.seq_len):
            raise RequestError("without a pad_token_id the classifier pools at the last column, as transformers "
                               "does: pad on the left")
    results, per_token = [], shapes.head != "sequence-classification"  # the pooled classifier's is per row
    for start in range(0, len(prompts), shapes.batch):
        group = prompts[start:start + shapes.batch]
        outputs = backend.run(*padded_batch(group, shapes, pad_token_id, side))
        for row, prompt in enumerate(group):
            columns = slice(shapes.seq_len - len(prompt), None) if side == "left" else slice(0, len(prompt))
            results.append(HeadResult(prompt, {name: value[row, columns] if per_token else value[row]
                                               for name, value in outputs.items()}))
    return results

