"""Next-token choice: greedy, penalties, top-k/top-p, temperature, seeds."""
from __future__ import annotations

import numpy as np
import pytest

from mixtral_export.runtimes.sampling import Sampler, SamplingParams, next_tokens
from mixtral_export.runtimes.step import RequestError


def random_logits(rows=4, vocab=50, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, vocab)).astype(np.float32)  # (B, V)


def no_history(rows: int) -> list[list[int]]:
    return [[] for _ in range(rows)]


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(repetition_penalty=0.0), dict(top_k=1.5), dict(seed="1")])
def test_params_are_validated(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_greedy_is_argmax_with_ties_to_the_lowest_id():
    logits = random_logits()
    logits[0, [5, 9]] = 10.0
    chosen = Sampler(SamplingParams()).next_tokens(logits, no_history(4))
    assert chosen.dtype == np.int64 and chosen.tolist() == [5, *logits[1:].argmax(-1).tolist()]


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = random_logits(rows=64)

    def draws(seed):
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return np.concatenate([sampler.next_tokens(logits, no_history(64)) for _ in range(3)])

    assert np.array_equal(draws(3), draws(3)) and not np.array_equal(draws(3), draws(4))


def test_top_k_one_is_greedy():
    logits = random_logits(rows=32)
    chosen = Sampler(SamplingParams(temperature=1.5, top_k=1, seed=0)).next_tokens(logits, no_history(32))
    assert chosen.tolist() == logits.argmax(-1).tolist()


def test_tiny_top_p_is_greedy():
    logits = random_logits(rows=32)
    chosen = Sampler(SamplingParams(temperature=1.5, top_p=1e-6, seed=0)).next_tokens(logits, no_history(32))
    assert chosen.tolist() == logits.argmax(-1).tolist()


def test_top_k_draws_only_from_the_k_best():
    logits = np.tile(np.array([[0.0, 3.0, 1.0, 2.0, 2.5]], dtype=np.float32), (2000, 1))  # (2000, 5)
    chosen = Sampler(SamplingParams(temperature=5.0, top_k=2, seed=0)).next_tokens(logits, no_history(2000))
    assert set(chosen.tolist()) == {1, 4}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = np.tile(np.log(probs).astype(np.float32), (4000, 1))  # (4000, 4)
    chosen = Sampler(SamplingParams(temperature=1.0, top_p=0.75, seed=0)).next_tokens(logits, no_history(4000))
    assert set(chosen.tolist()) == {1, 3}
    assert abs((chosen == 1).mean() - 0.5 / 0.8) < 0.03


def test_repetition_penalty_demotes_a_seen_token():
    logits = np.array([[2.0, 1.9, -1.0, -1.2]], dtype=np.float32)
    plain = Sampler(SamplingParams()).next_tokens(logits, [[0]])
    penalized = Sampler(SamplingParams(repetition_penalty=1.2)).next_tokens(logits, [[0, 0]])
    assert plain.tolist() == [0] and penalized.tolist() == [1]


def test_repetition_penalty_multiplies_negative_logits():
    logits = np.array([[-1.0, -1.1, -5.0]], dtype=np.float32)
    chosen = Sampler(SamplingParams(repetition_penalty=1.2)).next_tokens(logits, [[0, 2]])
    assert chosen.tolist() == [1]  # -1.0 * 1.2 = -1.2 < -1.1


def test_temperature_frequencies_follow_the_softmax():
    logits = np.array([1.0, 0.5, -0.5], dtype=np.float32)
    temperature, draws = 0.7, 20000
    sampler = Sampler(SamplingParams(temperature=temperature, seed=11))
    chosen = sampler.next_tokens(np.tile(logits, (draws, 1)), no_history(draws))
    expected = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
    assert np.abs(np.bincount(chosen, minlength=3) / draws - expected).max() < 0.02


def test_nan_logits_are_refused():
    logits = random_logits(rows=1)
    logits[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        Sampler(SamplingParams()).next_tokens(logits, no_history(1))


def test_batched_choice_equals_each_row_on_its_own_sampler():
    """The engine's one call per step: plain greedy rows in one argmax, the others (seeded draws, a penalty)
    by their own sampler, each the same token as that row alone, its generator advanced once."""
    logits = random_logits(rows=6, seed=3)
    logits[1, [7, 2]] = 9.0  # a tie: the lowest id wins
    params = [SamplingParams(), SamplingParams(), SamplingParams(temperature=1.0, seed=5),
              SamplingParams(repetition_penalty=1.3), SamplingParams(temperature=0.7, top_p=0.9, seed=8),
              SamplingParams()]
    history = [[1, 2], [3], [4, 4], [int(logits[3].argmax()), 0], [], [9]]
    together = next_tokens([Sampler(p) for p in params], logits, history)
    alone = [int(Sampler(p).next_tokens(logits[i:i + 1], [history[i]])[0]) for i, p in enumerate(params)]
    assert together == alone and together[1] == 2
    assert together[3] != int(logits[3].argmax())  # the penalty row really went through its sampler
    seeded = Sampler(params[2])
    draws = [next_tokens([seeded], random_logits(rows=1, seed=s), [[]])[0] for s in range(2)]
    fresh = Sampler(params[2])
    assert draws == [int(fresh.next_tokens(random_logits(rows=1, seed=s), [[]])[0]) for s in range(2)]


def test_batched_choice_refuses_nan_in_a_greedy_row():
    logits = random_logits(rows=3)
    logits[2, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        next_tokens([Sampler(SamplingParams()) for _ in range(3)], logits, no_history(3))


def test_presence_and_frequency_penalties_follow_openais_definition():
    """Each generated token's logit loses presence * 1[count > 0] + frequency * count; prompt ids count not."""
    logits = random_logits(rows=1, seed=4)  # (1, V)
    prompt, generated = [5, 5, 6], [7, 7, 7, 8]
    params = SamplingParams(temperature=1.0, seed=2, presence_penalty=0.5, frequency_penalty=-1.25)
    expected = logits.astype(np.float64).copy()
    expected[0, 7] -= 0.5 + -1.25 * 3
    expected[0, 8] -= 0.5 + -1.25 * 1
    draws = Sampler(params, prompt_length=len(prompt)).next_tokens(np.tile(logits, (2000, 1)),
                                                                   [prompt + generated] * 2000)
    reference = Sampler(SamplingParams(temperature=1.0, seed=2)).next_tokens(
        np.tile(expected.astype(np.float32), (2000, 1)), no_history(2000))
    assert draws.tolist() == reference.tolist()  # the same scores, so the same seeded draws
    top = int(logits[0].argmax())
    pushed = Sampler(SamplingParams(presence_penalty=2.0, frequency_penalty=2.0), prompt_length=1)
    assert pushed.next_tokens(logits, [[top, top]])[0] != top  # generated twice: 6 below
    assert Sampler(SamplingParams(presence_penalty=2.0), prompt_length=2).next_tokens(logits, [[top, top]])[0] == top


def test_logit_bias_forces_or_bans_a_token_greedy_or_sampled():
    logits = random_logits(rows=1, seed=6)
    low = int(logits[0].argmin())
    for temperature in (0.0, 1.0):
        forced = Sampler(SamplingParams(temperature=temperature, seed=1, logit_bias={str(low): 100}))
        assert all(forced.next_tokens(logits, [[]])[0] == low for _ in range(20))
    top = int(logits[0].argmax())
    banned = Sampler(SamplingParams(logit_bias=((top, -100.0),))).next_tokens(logits, [[]])[0]
    assert banned == int(np.argsort(-logits[0], kind="stable")[1])
    assert not SamplingParams(logit_bias={1: 2.0}).plain and SamplingParams().plain


@pytest.mark.parametrize("options", [dict(presence_penalty=2.5), dict(frequency_penalty=-3),
                                     dict(logit_bias={1: 101}), dict(logit_bias={-1: 0}), dict(logit_bias={"x": 1})])
def test_penalties_and_biases_out_of_range_are_refused(options):
    with pytest.raises(RequestError):
        SamplingParams(**options)
