"""Next-token choice from logits: greedy or seeded sampling, in the order transformers applies it.

Pure numpy (serves ONNX Runtime without torch). Order: repetition penalty, presence and frequency
penalties (OpenAI's, over the generated ids only), logit bias, a grammar's mask (only for a
constrained request: runtimes/constraint.py), then (when sampling) temperature, top-k, top-p, and a
draw in float64.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mixtral_export.runtimes.step import RequestError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; the CTRL rule over the row's prompt + generated ids
    seed: int | None = None
    presence_penalty: float = 0.0  # -2..2: subtracted from each token generated at least once
    frequency_penalty: float = 0.0  # -2..2: times the count of each token generated so far, subtracted
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, -100..100 added to its logit), by id

    def __post_init__(self) -> None:
        bias = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        try:
            bias = tuple(sorted((int(t), float(b)) for t, b in bias if not isinstance(t, bool)))
        except (TypeError, ValueError):
            raise RequestError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}") from None
        object.__setattr__(self, "logit_bias", bias)
        if not self.temperature >= 0:
            raise RequestError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            raise RequestError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise RequestError(f"seed must be an integer or None, got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise RequestError(f"{name} must be in [-2, 2] (0 = off), got {getattr(self, name)!r}")
        if any(t < 0 or not -100 <= b <= 100 for t, b in self.logit_bias):
            raise RequestError(f"logit_bias maps token ids >= 0 to biases in [-100, 100], got {self.logit_bias!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain(self) -> bool:
        """No penalty or bias changes the logits before the choice."""
        return (self.repetition_penalty == 1.0 and self.presence_penalty == 0 and self.frequency_penalty == 0
                and not self.logit_bias)


class Sampler:
    """Chooses one token per row; its generator is seeded once, so a seed replays a whole run. The
    generator is made at the first draw: greedy requests (most of a server's) never pay for seeding
    one from OS entropy. The first `prompt_length` ids of each history are the prompt: presence and
    frequency penalties count the ids after them."""

    def __init__(self, params: SamplingParams, prompt_length: int = 0):
        self.params, self.prompt_length = params, prompt_length
        self._rng: np.random.Generator | None = None
        self.bias_ids = np.array([t for t, _ in params.logit_bias], dtype=np.int64)  # (k,)
        self.bias = np.array([b for _, b in params.logit_bias], dtype=np.float32)  # (k,)

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None:
            self._rng = np.random.default_rng(self.params.seed)
        return self._rng

    def next_tokens(self, logits: np.ndarray, history: list[list[int]]) -> np.ndarray:
        """logits (B, V) for the next position; history[b] = row b's prompt + generated ids."""
        return self.choose(self.scores(logits, history))

    def scores(self, logits: np.ndarray, history: list[list[int]]) -> np.ndarray:
        """A float32 copy (B, V) of the logits after repetition penalty, presence and frequency penalties
        and logit bias: what a grammar's mask then applies to (runtimes/constraint.py)."""
        if logits.ndim != 2 or len(history) != logits.shape[0]:
            raise ValueError(f"logits {logits.shape} must be (B, V) with one history per row ({len(history)})")
        if np.isnan(logits).any():
            raise ValueError("logits contain NaN")
        scores = penalize_repeats(logits, history, self.params.repetition_penalty)  # (B, V) float32
        if self.params.presence_penalty or self.params.frequency_penalty:
            penalize_generated(scores, [ids[self.prompt_length:] for ids in history], self.params.presence_penalty,
                               self.params.frequency_penalty)
        if self.bias_ids.size:  # ids within the vocabulary: checked at admission
            scores[:, self.bias_ids] += self.bias
        return scores

    def choose(self, scores: np.ndarray) -> np.ndarray:
        """One token per row of scores (B, V): the argmax, or temperature, top-k, top-p and a draw."""
        if self.params.greedy:
            return scores.argmax(axis=-1).astype(np.int64)  # first maximum = lowest id, like torch
        return self.draw(scores.astype(np.float64) / self.params.temperature)

    def draw(self, scores: np.ndarray) -> np.ndarray:
        """Top-k, top-p and one draw per row from float64 scores (B, V)."""
        batch, vocab = scores.shape
        order = np.argsort(-scores, axis=-1, kind="stable")  # (B, V) best first, ties -> lowest id
        ranked = np.take_along_axis(scores, order, axis=-1)  # (B, V) descending
        if 0 < self.params.top_k < vocab:
            ranked[:, self.params.top_k:] = -np.inf
        probs = softmax(ranked)  # (B, V)
        if self.params.top_p < 1.0:
            mass_before = np.cumsum(probs, axis=-1) - probs  # (B, V)
            keep = mass_before < self.params.top_p  # the smallest set reaching top_p
            keep[:, 0] = True
            probs = np.where(keep, probs, 0.0)
        cdf = np.cumsum(probs, axis=-1)  # (B, V)
        threshold = self.rng.random(batch) * cdf[:, -1]  # (B,)
        picked = np.minimum((cdf <= threshold[:, None]).sum(axis=-1), vocab - 1)  # first cdf > u
        return order[np.arange(batch), picked].astype(np.int64)


def plain_greedy(sampler) -> bool:
    """A Sampler that takes the argmax as is (greedy, no penalty or bias): batchable across rows."""
    return isinstance(sampler, Sampler) and sampler.params.greedy and sampler.params.plain


def next_tokens(samplers: list, logits: np.ndarray, history: list[list[int]]) -> list[int]:
    """One token per row of logits (n, V), row i chosen by samplers[i]: all plain greedy rows in one
    argmax (the engine's common case, one numpy call per step instead of one per row), every other
    row by its own sampler, so a seeded draw depends on its own request only."""
    tokens = [0] * len(samplers)
    greedy = [i for i, sampler in enumerate(samplers) if plain_greedy(sampler)]
    if greedy:
        scores = logits[greedy] if len(greedy) < len(samplers) else logits  # (g, V)
        if np.isnan(scores).any():
            raise ValueError("logits contain NaN")
        for i, token in zip(greedy, scores.argmax(axis=-1).tolist()):  # first maximum = lowest id, like torch
            tokens[i] = token
    for i, sampler in enumerate(samplers):
        if not plain_greedy(sampler):
            tokens[i] = int(sampler.next_tokens(logits[i:i + 1], [history[i]])[0])
    return tokens


def penalize_repeats(logits: np.ndarray, history: list[list[int]], penalty: float) -> np.ndarray:
    """HF/CTRL repetition penalty on a float32 copy: seen tokens get logit/penalty if > 0 else logit*penalty."""
    scores = np.array(logits, dtype=np.float32)  # (B, V)
    if penalty == 1.0:
        return scores
    for row, ids in enumerate(history):
        seen = np.unique(np.asarray(ids, dtype=np.int64))
        if seen.size:
            values = scores[row, seen]
            scores[row, seen] = np.where(values > 0, values / penalty, values * penalty)
    return scores


def penalize_generated(scores: np.ndarray, generated: list[list[int]], presence: float, frequency: float) -> None:
    """OpenAI's penalties, in place on scores (B, V): each generated token's logit loses
    presence * 1[count > 0] + frequency * count."""
    for row, ids in enumerate(generated):
        if ids:
            tokens, counts = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)  # (u,), (u,)
            scores[row, tokens] -= (presence + frequency * counts).astype(np.float32)


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))  # (B, V) float64
    return shifted / shifted.sum(axis=-1, keepdims=True)
