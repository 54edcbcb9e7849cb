"""A saved reference run for `eval`: each scored token's next-token distribution, kept compact.

A reference holds the windows it scored (so a later run can prove it scores the same tokens), the
model config it came from, and per scored token: the exact NLL (float64, so the reference's
perplexity is reproduced exactly), the argmax (top-1 agreement is exact too) and the log-probabilities
of the whole vocabulary as uint16 codes over the row's own range, as llama.cpp's KL file does:
2 bytes per vocabulary entry, half of float32. The rounding is at most half a step of range / 65535
(2e-4 nats on the tiny model's 20-nat range); it moves a KL divergence by about its mean square,
measured 2.5e-9 nats for two fp32 runs and 4e-6 relative on an int4 KL mean.
"""
from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixtral_export.destinations import WRITER, write_file
from mixtral_export.errors import UserError

MARK = f"{WRITER} eval"
LEVELS = 65535  # uint16 codes


class ReferenceError(UserError, ValueError):
    """A saved reference that cannot be used for this run; one line naming the file."""


@dataclass(frozen=True)
class LogitReference:
    model: dict  # the model config (MixtralConfig.to_dict()) whose logits these are
    windows: np.ndarray  # (W, ctx) int64: the token ids scored
    nll: np.ndarray  # (N,) float64: -log p(token) for each scored token, window by window
    top1: np.ndarray  # (N,) int64: the argmax of each scored token's distribution
    codes: np.ndarray  # (N, V) uint16: log-probabilities, low + code * step
    low: np.ndarray  # (N,) float64
    step: np.ndarray  # (N,) float64

    @property
    def per_window(self) -> int:
        return len(self.nll) // len(self.windows)

    def log_probs(self, window: int) -> np.ndarray:
        """(n, V) float64 log-probabilities of one window's scored tokens, decoded and renormalised."""
        rows = slice(window * self.per_window, (window + 1) * self.per_window)
        from mixtral_export.runtimes.logprobs import log_softmax

        return log_softmax(self.low[rows, None] + self.codes[rows].astype(np.float64) * self.step[rows, None])


def encode(log_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes (n, V) uint16, low (n,), step (n,)) of (n, V) float64 log-probabilities."""
    low, high = log_probs.min(-1), log_probs.max(-1)
    step = np.maximum(high - low, 1e-12) / LEVELS
    codes = np.rint((log_probs - low[:, None]) / step[:, None]).astype(np.uint16)  # (n, V)
    return codes, low, step


def build(model: dict, windows: np.ndarray, nll: list[np.ndarray], top1: list[np.ndarray],
          parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> LogitReference:
    """A reference from per-window scored NLLs (n,), argmaxes (n,) and encoded log-probabilities."""
    return LogitReference(model=model, windows=np.asarray(windows, dtype=np.int64), nll=np.concatenate(nll),
                          top1=np.concatenate(top1).astype(np.int64),
                          codes=np.concatenate([p[0] for p in parts]), low=np.concatenate([p[1] for p in parts]),
                          step=np.concatenate([p[2] for p in parts]))


def save(path: str | Path, reference: LogitReference) -> Path:
    """Write the reference (.npz) atomically; replaces only an earlier reference of ours."""
    buffer = io.BytesIO()
    np.savez(buffer, written_by=np.array(MARK), model=np.array(json.dumps(reference.model, sort_keys=True)),
             windows=reference.windows, nll=reference.nll, top1=reference.top1, codes=reference.codes,
             low=reference.low, step=reference.step)
    return write_file(path, buffer.getvalue(), is_ours)


def is_ours(path: Path) -> bool:
    try:
        with np.load(path, allow_pickle=False) as saved:
            return str(saved["written_by"]) == MARK
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return False


def load(path: str | Path) -> LogitReference:
    """A reference written by `eval --save-logits`; anything else is refused in one line."""
    path = Path(path)
    if not path.is_file():
        raise ReferenceError(f"{path}: no such reference file (write one with eval --save-logits)")
    if not is_ours(path):
        raise ReferenceError(f"{path}: not a reference written by eval --save-logits")
    with np.load(path, allow_pickle=False) as saved:
        return LogitReference(model=json.loads(str(saved["model"])), windows=saved["windows"], nll=saved["nll"],
                              top1=saved["top1"], codes=saved["codes"], low=saved["low"], step=saved["step"])


def check_matches(reference: LogitReference, path: str | Path, model: dict, windows: np.ndarray) -> None:
    """Refuse a reference of another model, or of other windows, than this run scores."""
    if reference.model != model:
        changed = sorted(key for key in set(model) | set(reference.model) if model.get(key) != reference.model.get(key))
        raise ReferenceError(f"{path}: a reference from another model (config differs in {', '.join(changed)})")
    if reference.windows.shape != windows.shape or not np.array_equal(reference.windows, windows):
        raise ReferenceError(f"{path}: a reference of other windows ({len(reference.windows)} of "
                             f"{reference.windows.shape[1]} tokens) than this run's ({len(windows)} of "
                             f"{windows.shape[1]}): give the same tokens and --ctx")
