"""The engine: batch rows lent to requests, admission at any step, isolation, cancel, timeout, queue bound."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from mixtral_export.artifact.contract import NO_POSITION
from mixtral_export.runtimes.engine import Engine
from mixtral_export.runtimes.generate import generate
from mixtral_export.runtimes.requests import EngineClosed, GenerationConfig, QueueFull
from mixtral_export.runtimes.sampling import SamplingParams
from tests.test_generate import PROMPTS, Pieces, ToyLM

# (prompt, max_new_tokens, engine step at which it arrives): mixed lengths, outputs and arrivals
ARRIVALS = [([3, 7, 1, 9, 4, 4, 2, 8, 5, 6, 1], 9, 0), ([11], 4, 0), ([5, 6, 7], 12, 1), ([2, 2], 3, 2),
            ([20, 21, 22, 23, 24, 25, 26], 6, 4), ([9] * 13, 5, 5), ([1, 2], 10, 9)]


def config(max_new_tokens=8, **sampling) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, sampling=SamplingParams(**sampling))


def alone(prompt, cfg) -> list[int]:
    return generate(ToyLM(batch=1, chunk=4, slots=16), [prompt], cfg).completions[0].token_ids


def run_arrivals(engine, make_config) -> list:
    """Submit ARRIVALS at their steps, step until all end; the requests in ARRIVALS order."""
    requests, step = [None] * len(ARRIVALS), 0
    while step < 200 and not (all(requests) and all(r.ended.is_set() for r in requests)):
        for n, (prompt, new, at) in enumerate(ARRIVALS):
            if at == step:
                requests[n] = engine.submit(prompt, make_config(n, new), index=n)
        engine.step()
        step += 1
    return requests


@pytest.mark.parametrize("ride_along", [True, False])
def test_every_request_equals_itself_run_alone(ride_along):
    lm = ToyLM(batch=3, chunk=4, slots=16)  # ToyLM asserts every row's positions arrive in order from 0
    engine = Engine(lm, ride_along=ride_along)
    requests = run_arrivals(engine, lambda n, new: config(new))
    assert [r.completion.token_ids for r in requests] == [alone(p, config(new)) for p, new, _ in ARRIVALS]
    assert all(r.completion.finish_reason == "length" for r in requests)
    assert engine.busy_rows == 0 and engine.queue_depth == 0


def test_sampled_requests_keep_their_own_seed_whatever_shares_the_batch():
    make = lambda n, new: config(new, temperature=1.0, seed=100 + n)
    together = [r.completion.token_ids for r in run_arrivals(Engine(ToyLM(batch=2, slots=16)), make)]
    assert together == [alone(p, make(n, new)) for n, (p, new, _) in enumerate(ARRIVALS)]


def test_a_reused_row_sees_nothing_of_its_previous_occupant():
    lm = ToyLM(batch=1, chunk=4, slots=16)
    engine = Engine(lm)
    first = engine.submit([4, 5, 6, 7, 8, 9, 10], config(6))
    second = engine.submit([4, 5], config(6))  # same first tokens: stale keys would be "visible" to it
    rows = {}
    while not (first.ended.is_set() and second.ended.is_set()):
        engine.step()
        for name, handle in (("first", first), ("second", second)):
            if (row := engine.row_of(handle)) is not None:
                rows.setdefault(name, row)
    assert rows == {"first": 0, "second": 0}
    assert second.completion.token_ids == alone([4, 5], config(6))


def test_cancel_frees_the_row_at_the_next_step():
    engine = Engine(ToyLM(batch=1, slots=16))
    long = engine.submit(PROMPTS[0], config(50))
    waiting = engine.submit(PROMPTS[2], config(3))
    engine.step()
    engine.step()
    assert engine.row_of(long) == 0 and engine.row_of(waiting) is None
    long.cancel()
    engine.step()
    assert long.completion.finish_reason == "cancelled" and engine.row_of(waiting) == 0
    for _ in engine.drive([waiting]):
        pass
    assert waiting.completion.token_ids == alone(PROMPTS[2], config(3))


def test_max_rows_one_serializes_requests():
    engine = Engine(ToyLM(batch=2, slots=16), max_rows=1)
    first, second = engine.submit(PROMPTS[0], config(4)), engine.submit(PROMPTS[2], config(4))
    engine.step()
    assert engine.busy_rows == 1 and engine.row_of(second) is None
    for _ in engine.drive([first, second]):
        pass
    assert second.completion.token_ids == alone(PROMPTS[2], config(4))


def test_full_queue_refuses_at_once_and_a_closed_engine_admits_nothing():
    engine = Engine(ToyLM(batch=1), max_queue=2)
    engine.submit([1], config())
    engine.submit([2], config())
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit([3], config())
    engine.step()  # one admitted: room for one more
    engine.submit([4], config())
    engine.close()
    with pytest.raises(EngineClosed):
        engine.submit([5], config())


def test_timeout_ends_a_running_and_a_queued_request():
    engine = Engine(ToyLM(batch=1, slots=16))
    running = engine.submit(PROMPTS[0], config(50), timeout=0.05)
    queued = engine.submit(PROMPTS[1], config(50), timeout=0.05)
    for _ in range(4):  # 9 prompt tokens in chunks of 4, then a decode step
        engine.step()
    time.sleep(0.06)
    engine.step()
    assert running.completion.finish_reason == "timeout" and queued.completion.finish_reason == "timeout"
    assert 0 < len(running.completion.token_ids) < 50 and queued.completion.token_ids == []
    assert engine.busy_rows == 0 and engine.queue_depth == 0


def test_bad_requests_are_refused_at_submit():
    engine = Engine(ToyLM(batch=1))
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], config())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([99], config())
    with pytest.raises(ValueError, match="detokenizer"):
        engine.submit([1], GenerationConfig(max_new_tokens=2, stop_strings=("x",)))
    with pytest.raises(ValueError, match="timeout"):
        engine.submit([1], config(), timeout=0)


def test_a_failing_step_ends_its_requests_not_the_engine():
    lm = ToyLM(batch=1, slots=16)
    engine = Engine(lm).start()
    real_step = lm.step
    lm.step = lambda *a: (_ for _ in ()).throw(RuntimeError("device lost"))
    broken = engine.submit([1, 2], config(4))
    with pytest.raises(RuntimeError, match="device lost"):
        broken.result(timeout=10)
    lm.step = real_step
    assert engine.submit([1, 2], config(4)).result(timeout=10).token_ids == alone([1, 2], config(4))
    engine.close()


def test_threads_and_asyncio_share_the_background_engine():
    engine = Engine(ToyLM(batch=2, chunk=4, slots=16)).start()
    expected = [alone(p, config(new)) for p, new, _ in ARRIVALS]
    got: dict[int, list[int]] = {}

    def work(n):
        prompt, new, _ = ARRIVALS[n]
        got[n] = [e.token_id for e in engine.submit(prompt, config(new), index=n)]

    async def consume(n):
        prompt, new, _ = ARRIVALS[n]
        got[n] = [e.token_id async for e in engine.submit(prompt, config(new), index=n)]

    async def main():
        await asyncio.gather(*(consume(n) for n in range(0, len(ARRIVALS), 2)))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(1, len(ARRIVALS), 2)]
    for t in threads:
        t.start()
    asyncio.run(asyncio.wait_for(main(), 30))
    for t in threads:
        t.join(30)
    engine.close(grace=1)
    assert [got[n] for n in range(len(ARRIVALS))] == expected


def test_close_with_grace_lets_running_requests_finish_and_cancels_the_rest():
    engine = Engine(ToyLM(batch=1, slots=16)).start()
    short = engine.submit([1, 2], config(3))
    short.result(timeout=10)
    endless = engine.submit([3], GenerationConfig(max_new_tokens=10**6))
    engine.close(grace=0.05)
    assert endless.result(timeout=10).finish_reason == "cancelled"
    assert short.completion.finish_reason == "length"


def test_a_dropped_session_ends_its_engine_thread(tiny_onnx):
    import gc

    from mixtral_export.runtimes.session import Session

    session = Session.open(tiny_onnx)
    thread = session.client.engine.thread
    assert session.generate("hi", max_new_tokens=2) and thread.is_alive()
    del session
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()


def test_stop_string_and_text_per_request():
    lm = ToyLM(batch=2, slots=16)
    full = generate(ToyLM(slots=16), [PROMPTS[0]], config(20), Pieces).completions[0]
    stop = full.text[4:6]
    engine = Engine(lm)
    cut = engine.submit(PROMPTS[0], GenerationConfig(max_new_tokens=20, stop_strings=(stop,)), Pieces())
    plain = engine.submit(PROMPTS[0], config(20), Pieces())
    for _ in engine.drive([cut, plain]):
        pass
    assert cut.completion.finish_reason == "stop_string" and cut.completion.text == full.text[:full.text.index(stop)]
    assert plain.completion.text == full.text


# ---- on the real ONNX Runtime backend (fp32 tiny artifact: batch 2, chunk 8, 32-slot ring) ----

def test_ort_reset_clears_only_the_rows_named(tiny_onnx):
    from mixtral_export.runtimes.ort import OrtBackend

    backend = OrtBackend(tiny_onnx)
    ids = np.full((2, 8), 5, dtype=np.int64)
    backend.step(ids, np.tile(np.arange(8), (2, 1)))
    backend.reset(rows=[1])
    assert (backend.cache_positions[0, :8] == np.arange(8)).all() and (backend.cache_positions[1] == NO_POSITION).all()
    assert np.abs(backend.cache_k[:, 0]).sum() > 0 and not backend.cache_k[:, 1].any() and not backend.cache_v[:, 1].any()


def test_ort_engine_matches_solo_runs_and_a_reused_row_is_clean(tiny_onnx, monkeypatch):
    from mixtral_export.runtimes.session import Session

    session = Session.open(tiny_onnx)
    eos = tuple(session.manifest.eos_token_id)
    prompts = [session.encode(t) for t in ("Beautiful is better than ugly. Explicit is better than implicit. "
                                           "Simple is better than complex.", "a", "Flat is better", "x y z w",
                                           "Now is better than never. Although never is often better.")]
    news = [14, 6, 20, 3, 9]
    solo = [session.generate_ids([p], max_new_tokens=n).completions[0].token_ids for p, n in zip(prompts, news)]

    def together():
        requests = []
        for n, (prompt, new) in enumerate(zip(prompts, news)):  # staggered arrivals while others run
            requests.append(session.submit(prompt, index=n, max_new_tokens=new))
            time.sleep(0.01 * n)
        return [r.result(timeout=60).token_ids for r in requests]

    assert together() == solo
    assert all(t and not set(t[:-1]) & set(eos) for t in solo)  # no early EOS: the lengths differ as asked
    monkeypatch.setattr(session.backend, "reset", lambda rows=None: None)  # control: the test can fail
    assert together() != solo
    session.close()


def test_eager_reset_clears_only_the_rows_named_and_the_engine_matches_solo(tiny_onnx):
    from mixtral_export.runtimes.load import open_backend

    backend, _ = open_backend(tiny_onnx, "eager")
    ids = np.full((2, 8), 5, dtype=np.int64)
    backend.step(ids, np.tile(np.arange(8), (2, 1)))
    backend.reset(rows=[0])
    ring = backend.ring
    assert (ring.cache_positions[0] == NO_POSITION).all() and (ring.cache_positions[1, :8] == np.arange(8)).all()
    assert not ring.cache_k[:, 0].any() and ring.cache_k[:, 1].abs().sum() > 0
    prompts, news = [[7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [3], [4, 5, 6]], [9, 4, 6]
    solo = [generate(backend, [p], config(n)).completions[0].token_ids for p, n in zip(prompts, news)]
    engine = Engine(backend)
    requests = [engine.submit(p, config(n), index=i) for i, (p, n) in enumerate(zip(prompts, news))]
    for _ in engine.drive(requests):
        pass
    assert [r.completion.token_ids for r in requests] == solo


@pytest.mark.parametrize("prompts, lengths", [([list(range(3, 13))], [32, 1, 1]),  # 10 tokens: one T = 32 step
                                              ([[5, 6, 7, 8, 9]], [8, 1, 1]),
                                              ([[n % 29 + 2 for n in range(40)]], [32, 8, 1, 1]),  # 40 = 32 + 8
                                              ([[4] * 5, [6] * 20], [32, 1, 1])])  # the longer row decides
def test_each_prefill_step_takes_the_shortest_chunk_that_holds_the_longest_piece(prompts, lengths):
    lm = ToyLM(batch=len(prompts), chunk=(8, 32), slots=64, window=None)
    result = generate(lm, prompts, config(3))
    assert lm.lengths == lengths
    assert [c.token_ids for c in result.completions] == \
        [generate(ToyLM(batch=1, chunk=1, slots=64, window=None), [p], config(3)).completions[0].token_ids
         for p in prompts]


@pytest.mark.parametrize("chunks", [(2, 8), (3, 8, 16)])
def test_arrivals_are_the_same_whatever_the_chunk_list(chunks):
    engine = Engine(ToyLM(batch=3, chunk=chunks, slots=16))
    requests = run_arrivals(engine, lambda n, new: config(new))
    assert [r.completion.token_ids for r in requests] == [alone(p, config(new)) for p, new, _ in ARRIVALS]
    assert set(engine.backend.lengths) == {*chunks, 1}  # every length served was used


def test_an_onnx_artifact_with_two_prefill_chunks_generates_what_one_chunk_does(tiny_checkpoint, tiny_onnx,
                                                                               tmp_path, monkeypatch):
    from mixtral_export.graphs.onnx_export import export_onnx
    from mixtral_export.runtimes.session import Session

    artifact = export_onnx(tiny_checkpoint, tmp_path / "p4+8", dtype="float32", batch=2, prefill_chunk=(4, 8),
                           cache_slots=32)
    prompts = [[1, 5, 9], [1, *range(20, 30)], [1, *range(40, 44)], [1, *range(50, 69)]]
    one, two = Session.open(tiny_onnx), Session.open(artifact)
    assert two.manifest.chunks == (8, 4, 1)
    lengths = []
    step = two.backend.step
    monkeypatch.setattr(two.backend, "step",
                        lambda ids, positions: (lengths.append(ids.shape[1]), step(ids, positions))[1])
    for prompt in prompts:
        assert two.generate_ids([prompt], max_new_tokens=6).completions[0].token_ids == \
            one.generate_ids([prompt], max_new_tokens=6).completions[0].token_ids  # fp32, token for token
    assert [lengths.count(4), lengths.count(8)] == [3, 4]  # prompts of 3, 11 = 8 + 3, 5 and 20 = 8 + 8 + 4 tokens
    one.close()
    two.close()
