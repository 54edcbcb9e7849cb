"""The generation loop, driven through a fake numpy backend that checks the step contract itself."""
from __future__ import annotations

import numpy as np
import pytest

from mixtral_export.artifact.contract import NO_POSITION, StepShapes
from mixtral_export.runtimes.generate import generate, stream
from mixtral_export.runtimes.requests import GenerationConfig
from mixtral_export.runtimes.sampling import SamplingParams
from mixtral_export.runtimes.step import ContextOverflow, check_step_inputs, ring_writes

VOCAB = 32
PIECES = [chr(ord("a") + i % 26) + ("!" if i >= 26 else "") for i in range(VOCAB)]  # id -> text


class ToyLM:
    """A deterministic LM over its own ring cache of token ids.

    Next-token logits of the token at position p depend on its id, p, and a hash of every visible
    (position, id) pair: those of the ring plus the chunk up to p, within the attention window. It
    asserts each step is (B, T) for a T it serves (chunk: one prefill length or several), that every
    row's positions arrive in order without gaps, and that every key a query needs is still in its
    slot (never overwritten). Padding rows get NaN.
    """

    name = "toy"

    def __init__(self, batch=1, chunk=4, slots=8, window: int | None = 8, seed=0):
        chunks = (chunk,) if isinstance(chunk, int) else tuple(chunk)
        self.shapes = StepShapes(batch=batch, prefill_chunk=max(chunks), cache_slots=slots, num_layers=1,
                                 num_kv_heads=1, head_dim=1, vocab_size=VOCAB, dtype="float32",
                                 attention_window=window, prefill_chunks=chunks)
        self.lengths: list[int] = []  # T of every step, in order
        gen = np.random.default_rng(seed)
        self.by_token = gen.normal(size=(VOCAB, VOCAB)).astype(np.float32)  # (V, V)
        self.by_position = gen.normal(size=(64, VOCAB)).astype(np.float32)  # (64, V)
        self.by_history = 3 * gen.normal(size=(997, VOCAB)).astype(np.float32)  # (997, V)
        self.steps = 0
        self.reset()

    def reset(self, rows=None) -> None:
        batch, slots = self.shapes.batch, self.shapes.cache_slots
        if rows is None:
            self.cache_ids = np.zeros((batch, slots), dtype=np.int64)  # (B, S)
            self.cache_positions = np.full((batch, slots), NO_POSITION, dtype=np.int64)  # (B, S)
            self.fed = [0] * batch  # the next position each row must be given
        for row in range(batch) if rows is None else rows:
            self.cache_ids[row] = 0
            self.cache_positions[row] = NO_POSITION
            self.fed[row] = 0

    def step(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        assert input_ids.shape[0] == self.shapes.batch and input_ids.shape[1] in self.shapes.chunks
        check_step_inputs(self.shapes, VOCAB, input_ids, positions)
        self.steps += 1
        self.lengths.append(input_ids.shape[1])
        batch, chunk = input_ids.shape
        logits = np.full((batch, chunk, VOCAB), np.nan, dtype=np.float32)  # (B, T, V)
        for b in range(batch):
            for t in range(chunk):
                p = int(positions[b, t])
                if p == NO_POSITION:
                    continue
                assert p == self.fed[b], f"row {b}: position {p} fed, {self.fed[b]} expected"
                self.fed[b] += 1
                logits[b, t] = self.next_logits(b, p, input_ids[b, :t + 1], positions[b, :t + 1])
        rows, cols, slots = ring_writes(positions, self.shapes.cache_slots)
        self.cache_ids[rows, slots] = input_ids[rows, cols]
        self.cache_positions[rows, slots] = positions[rows, cols]
        return logits

    def next_logits(self, b: int, p: int, chunk_ids: np.ndarray, chunk_positions: np.ndarray) -> np.ndarray:
        window = self.shapes.attention_window or p + 1
        in_chunk = {int(q): int(i) for q, i in zip(chunk_positions, chunk_ids) if q != NO_POSITION}
        digest = 0
        for q in range(max(0, p - window + 1), p + 1):
            if q in in_chunk:
                token = in_chunk[q]
            else:
                slot = q % self.shapes.cache_slots
                assert self.cache_positions[b, slot] == q, f"row {b}: key {q} needed, slot {slot} lost it"
                token = int(self.cache_ids[b, slot])
            digest = (digest * 1_000_003 + token * 131 + q) % 2_147_483_647
        return self.by_token[in_chunk[p]] + self.by_position[p % 64] + self.by_history[digest % 997]


class Pieces:
    """Detokenizer: each id is its piece, at once."""

    def push(self, token_id: int) -> str:
        return PIECES[token_id]

    def flush(self) -> str:
        return ""


class Lagging:
    """Detokenizer that holds each piece back until the next push (so flush matters)."""

    def __init__(self):
        self.pending = ""

    def push(self, token_id: int) -> str:
        out, self.pending = self.pending, PIECES[token_id]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


PROMPTS = [[3, 7, 1, 9, 4, 4, 2, 8, 5], [11], [5, 6, 7], [20, 21, 22, 23, 24, 25, 26], [2, 2]]


def config(max_new_tokens=12, eos=(), stops=(), **sampling) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, sampling=SamplingParams(**sampling),
                            eos_token_ids=eos, stop_strings=stops)


def tokens(result) -> list[list[int]]:
    return [c.token_ids for c in result.completions]


def test_toy_lm_output_depends_on_the_whole_visible_history():
    lm = ToyLM(chunk=1, window=None, slots=16)
    last = []
    for prompt in ([1, 2, 3, 4], [9, 2, 3, 4]):
        lm.reset()
        for p, token in enumerate(prompt):
            logits = lm.step(np.array([[token]]), np.array([[p]]))
        last.append(logits[0, 0])
    assert not np.allclose(last[0], last[1])


def test_chunked_prefill_equals_token_by_token():
    chunked = generate(ToyLM(chunk=4), [PROMPTS[0]], config())
    single = generate(ToyLM(chunk=1), [PROMPTS[0]], config())
    assert tokens(chunked) == tokens(single)


def test_left_padded_batch_matches_each_prompt_alone():
    batched = generate(ToyLM(batch=2, chunk=4), PROMPTS, config(max_new_tokens=10))
    alone = [tokens(generate(ToyLM(batch=1, chunk=4), [p], config(max_new_tokens=10)))[0] for p in PROMPTS]
    assert tokens(batched) == alone
    assert [c.prompt_ids for c in batched.completions] == PROMPTS


def test_greedy_equals_the_argmax_chain():
    lm = ToyLM(chunk=1)
    ids, expected = list(PROMPTS[3]), []
    for p in range(len(ids) + 7):
        logits = lm.step(np.array([[ids[p]]]), np.array([[p]]))
        if p >= len(PROMPTS[3]) - 1:
            expected.append(int(logits[0, 0].argmax()))
            ids.append(expected[-1])
    assert tokens(generate(ToyLM(chunk=4), [PROMPTS[3]], config(max_new_tokens=8))) == [expected]


def test_eos_stops_its_row_and_keeps_the_eos_id_while_others_continue():
    full = tokens(generate(ToyLM(batch=2), PROMPTS[:2], config()))
    eos = next(t for t in full[0][1:] if t not in full[1])
    cut = full[0].index(eos) + 1
    result = generate(ToyLM(batch=2), PROMPTS[:2], config(eos=(eos,)), Pieces)
    first, second = result.completions
    assert first.token_ids == full[0][:cut] and first.finish_reason == "eos"
    assert first.text == "".join(PIECES[t] for t in full[0][:cut - 1])  # no text for the eos
    assert second.token_ids == full[1] and second.finish_reason == "length"


def test_max_new_tokens_bounds_every_row():
    result = generate(ToyLM(batch=2), PROMPTS, config(max_new_tokens=5))
    assert all(len(c.token_ids) == 5 and c.finish_reason == "length" for c in result.completions)


def test_stop_string_ends_the_row_and_truncates_the_text():
    full = generate(ToyLM(), [PROMPTS[0]], config(max_new_tokens=20), Pieces).completions[0]
    stop = full.text[6:9]
    at = full.text.index(stop)
    result = generate(ToyLM(), [PROMPTS[0]], config(max_new_tokens=20, stops=(stop, "never")), Pieces)
    done = result.completions[0]
    assert done.text == full.text[:at] and done.finish_reason == "stop_string"
    assert "".join(PIECES[t] for t in done.token_ids) == full.text[:at + len(stop)]  # completing token kept


def test_stop_strings_need_a_detokenizer():
    with pytest.raises(ValueError, match="detokenizer"):
        generate(ToyLM(), [PROMPTS[0]], config(stops=("x",)))


def test_stream_matches_generate_and_its_deltas_build_the_text():
    stop = generate(ToyLM(), [PROMPTS[2]], config(max_new_tokens=20), Pieces).completions[0].text[8:11]
    cfg = config(max_new_tokens=20, stops=(stop,))
    result = generate(ToyLM(batch=2), PROMPTS, cfg, Lagging)
    events = stream(ToyLM(batch=2), PROMPTS, cfg, Lagging)
    seen: list[tuple[int, int, str]] = []
    while True:
        try:
            event = next(events)
        except StopIteration as done:
            streamed = done.value
            break
        seen.append((event.index, event.token_id, event.text_delta))
    assert tokens(streamed) == tokens(result)
    for row, completion in enumerate(result.completions):
        assert [t for r, t, _ in seen if r == row] == completion.token_ids
        assert "".join(d for r, _, d in seen if r == row) == completion.text
    assert result.completions[2].finish_reason == "stop_string"
    assert result.completions[0].text == "".join(PIECES[t] for t in result.completions[0].token_ids)  # flushed


def test_on_token_sees_every_token():
    seen = []
    result = generate(ToyLM(batch=2), PROMPTS, config(max_new_tokens=4), on_token=seen.append)
    assert sorted((e.index, e.token_id) for e in seen) == sorted(
        (row, t) for row, c in enumerate(result.completions) for t in c.token_ids)


def test_prompt_longer_than_the_cache_raises_before_any_step():
    lm = ToyLM(slots=16, window=None)
    with pytest.raises(ContextOverflow, match=r"prompt 1 is 17 tokens long; the limit is 16"):
        generate(lm, [[1], [2] * 17], config())
    assert lm.steps == 0


def test_prompt_longer_than_max_positions_raises_before_any_step():
    lm = ToyLM()
    with pytest.raises(ContextOverflow, match=r"prompt 0 is 9 tokens long; the limit is 6"):
        stream(lm, [PROMPTS[0]], config(), max_positions=6)
    assert lm.steps == 0


def test_row_finishes_with_cache_full_at_the_last_position():
    result = generate(ToyLM(batch=2, slots=16, window=None), [[1] * 10, [2] * 16], config(max_new_tokens=50))
    first, second = result.completions
    assert len(first.token_ids) == 16 - 10 + 1 and first.finish_reason == "cache_full"
    assert len(second.token_ids) == 1 and second.finish_reason == "cache_full"


def test_max_positions_argument_limits_a_sliding_window_row():
    result = generate(ToyLM(), [PROMPTS[0]], config(max_new_tokens=50), max_positions=20)
    assert len(result.completions[0].token_ids) == 20 - 9 + 1
    assert result.completions[0].finish_reason == "cache_full"


def test_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(ToyLM(), [[1], []], config())


def test_seeded_sampling_is_reproducible():
    runs = [tokens(generate(ToyLM(batch=2), PROMPTS, config(temperature=1.0, seed=seed)))
            for seed in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_counts_and_timings():
    result = generate(ToyLM(batch=2), PROMPTS, config(max_new_tokens=6))
    assert result.prefill_tokens == sum(map(len, PROMPTS))
    assert result.decode_steps == 3 * 5  # three groups, five T=1 steps each
    assert result.decode_tokens == len(PROMPTS) * 5
    assert result.prefill_seconds > 0 and result.decode_seconds > 0
    assert result.decode_tokens_per_second > 0 and result.prefill_tokens_per_second > 0


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(max_new_tokens=1, stop_strings=("",)),
                                 dict(max_new_tokens=1, eos_token_ids=(-1,))])
def test_config_is_validated(bad):
    with pytest.raises(ValueError):
        GenerationConfig(**bad)
