"""The model's log-probabilities of sampled tokens: log-softmax of the raw logits, in float64.

Raw means before repetition penalty, temperature, penalties, logit bias and a grammar's mask: what
the model says, comparable with transformers' and eager's log-softmax, whatever a request's sampling
does. Pure numpy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_TOP_LOGPROBS = 20  # alternatives reported per token at most (OpenAI's bound)


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token's log-probability and the `top` most likely tokens at its position."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability), most likely first, ties -> lowest id

    def to_json(self) -> list:
        return [self.logprob, [list(pair) for pair in self.top]]

    @classmethod
    def from_json(cls, data: list) -> "TokenLogprob":
        return cls(data[0], tuple((int(t), float(p)) for t, p in data[1]))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(..., V) logits (or unnormalised log-probabilities) -> float64 log-probabilities, one log-softmax
    for logprobs, verify's KL and eval."""
    scores = np.asarray(logits, dtype=np.float64)  # (n, V)
    shifted = scores - scores.max(axis=-1, keepdims=True)  # (n, V)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def token_logprobs(logits: np.ndarray, tokens: list[int], tops: list[int | None]) -> list[TokenLogprob | None]:
    """Per row of logits (n, V): the log-probability of tokens[i] and its tops[i] best alternatives;
    None for a row whose request asked for none (tops[i] None)."""
    out: list[TokenLogprob | None] = [None] * len(tokens)
    rows = [i for i, top in enumerate(tops) if top is not None]
    if not rows:
        return out
    logprobs = log_softmax(logits[rows])  # (r, V)
    for k, i in enumerate(rows):
        count = min(tops[i], logprobs.shape[-1])
        best = np.argsort(-logprobs[k], kind="stable")[:count] if count else []  # ties -> lowest id
        out[i] = TokenLogprob(float(logprobs[k, tokens[i]]), tuple((int(t), float(logprobs[k, t])) for t in best))
    return out
