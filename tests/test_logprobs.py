"""Reported log-probabilities are transformers' log-softmax of the raw logits, whatever the sampling."""
from __future__ import annotations

import numpy as np
import pytest

from mixtral_export.runtimes.logprobs import TokenLogprob, log_softmax, token_logprobs

TOLERANCE = 1e-4  # fp32 graph against fp32 transformers, compared in float64


@pytest.fixture(scope="module")
def session(tiny_onnx):
    from mixtral_export.runtimes.session import Session

    session = Session.open(tiny_onnx)
    yield session
    session.close()


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.MixtralForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32,
                                                            attn_implementation="eager").eval()

    def logprobs(ids: list[int]) -> np.ndarray:
        """(len(ids), V) float64 log-softmax of transformers' logits at each position."""
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]  # (T, V) float32
        return torch.log_softmax(logits.double(), dim=-1).numpy()

    return logprobs


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.7, top_k=20, repetition_penalty=1.3, seed=5)])
def test_each_tokens_logprob_and_alternatives_equal_transformers(session, reference, sampling):
    prompt = session.encode("Simple is better than")
    completion = session.generate_ids([prompt], max_new_tokens=8, logprobs=5, **sampling).completions[0]
    assert len(completion.logprobs) == len(completion.token_ids) == 8
    expected = reference(prompt + completion.token_ids)[len(prompt) - 1:-1]  # (8, V): the position before each token
    for row, token, entry in zip(expected, completion.token_ids, completion.logprobs):
        assert abs(entry.logprob - row[token]) < TOLERANCE
        assert len(entry.top) == 5
        best = np.sort(row)[::-1][:5]
        assert np.abs(np.array([p for _, p in entry.top]) - best).max() < TOLERANCE
        assert all(abs(row[t] - p) < TOLERANCE for t, p in entry.top)  # each id with its own value
    if not sampling:  # greedy: each token is the most likely one
        assert [entry.top[0][0] for entry in completion.logprobs] == completion.token_ids


def test_no_logprobs_unless_asked(session):
    completion = session.generate_ids([session.encode("Hi")], max_new_tokens=2).completions[0]
    assert completion.logprobs is None


def test_token_logprobs_against_a_plain_log_softmax():
    logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32)  # (3, V)
    logits[1, [4, 9]] = 7.0  # a tie: the lower id first
    out = token_logprobs(logits, [2, 9, 0], [3, 2, None])
    expected = np.log(np.exp(logits.astype(np.float64)) / np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    assert out[2] is None and np.allclose(log_softmax(logits), expected, atol=1e-12)
    assert abs(out[0].logprob - expected[0, 2]) < 1e-12 and [t for t, _ in out[1].top] == [4, 9]
    assert [t for t, _ in out[0].top] == list(np.argsort(-expected[0])[:3])
    assert TokenLogprob.from_json(out[0].to_json()) == out[0]
