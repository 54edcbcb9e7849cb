"""The scheduling policy on plans alone, with no backend: admission order and the max_rows cap, decoders
riding along in a prefill step, the shortest chunk that holds a prompt's next piece, cancel and deadlines."""
from __future__ import annotations

import numpy as np

from mixtral_export.artifact.contract import NO_POSITION, StepShapes
from mixtral_export.runtimes.requests import GenerationConfig, RequestState
from mixtral_export.runtimes.scheduler import plan_step


def shapes(batch=3, chunks=(8,)) -> StepShapes:
    return StepShapes(batch=batch, prefill_chunk=max(chunks), cache_slots=64, num_layers=1, num_kv_heads=1,
                      head_dim=1, vocab_size=32, dtype="float32", attention_window=None, prefill_chunks=chunks)


def queued(prompt, index=0) -> RequestState:
    return RequestState(index, list(prompt), GenerationConfig(max_new_tokens=8))


def running(row, prompt, generated=(), fed=None) -> RequestState:
    """A request in `row`: prefilled up to `fed` (all of the prompt by default), then `generated` sampled."""
    state = queued(prompt)
    state.row, state.fed = row, len(prompt) if fed is None else fed
    state.ids += list(generated)
    return state


def plan(rows, waiting=(), max_rows=None, ride_along=True, now=0.0, **shape):
    step_shapes = shapes(**shape)
    return plan_step(rows, list(waiting), step_shapes, max_rows or step_shapes.batch, ride_along, now)


def test_the_queue_is_admitted_in_order_to_the_lowest_free_rows_up_to_max_rows():
    first, second, third = queued([1, 2], 0), queued([3], 1), queued([4, 5, 6], 2)
    busy = running(0, [7, 8], [9])
    p = plan([busy, None, None, None], [first, second, third], max_rows=3, batch=4)
    assert p.admitted == ((1, first), (2, second))  # row 3 is above the cap; `third` keeps waiting
    assert [row for row, _ in p.running] == [0, 1, 2]
    assert first.row is None and first.fed == 0  # the plan changes no request
    assert [r for _, r in plan([None] * 4, [first, second, third], max_rows=1, batch=4).admitted] == [first]


def test_decoders_ride_along_a_prefill_step_in_column_zero_or_sit_it_out():
    decoder = running(0, [4, 5, 6], [7, 8])  # next: token 8 at position 4
    newcomer = queued([1, 2, 3, 9, 10])
    along = plan([decoder, None], [newcomer], batch=2)
    assert along.length == 8 and along.prefill
    assert along.input_ids[0].tolist() == [8] + [0] * 7
    assert along.positions[0].tolist() == [4] + [NO_POSITION] * 7
    assert along.input_ids[1, :5].tolist() == [1, 2, 3, 9, 10]
    assert along.positions[1].tolist() == [0, 1, 2, 3, 4] + [NO_POSITION] * 3
    assert along.sample_at == ((0, 0), (1, 4)) and along.fed == ((1, 5),)
    apart = plan([decoder, None], [newcomer], batch=2, ride_along=False)
    assert [row for row, _ in apart.running] == [1] and apart.sample_at == ((1, 4),)
    assert (apart.positions[0] == NO_POSITION).all()


def test_decoding_alone_is_a_one_token_step():
    p = plan([running(0, [1, 2], [3]), None, running(2, [4], [5, 6])])
    assert p.length == 1 and not p.prefill
    assert p.input_ids[:, 0].tolist() == [3, 0, 6] and p.positions[:, 0].tolist() == [2, NO_POSITION, 2]
    assert p.sample_at == ((0, 0), (2, 0))


def test_the_shortest_chunk_that_holds_the_longest_piece_left():
    chunks = (4, 8, 32)
    assert plan([running(0, range(3), fed=0)], batch=1, chunks=chunks).length == 4
    assert plan([running(0, range(5), fed=0)], batch=1, chunks=chunks).length == 8
    assert plan([running(0, range(5), fed=0), running(1, range(20), fed=0)], batch=2, chunks=chunks).length == 32
    long = plan([running(0, range(40), fed=0)], batch=1, chunks=chunks)  # longer than any chunk: the largest
    assert long.length == 32 and long.fed == ((0, 32),) and long.sample_at == ()  # no logits of its last token yet
    rest = plan([running(0, range(40), fed=32)], batch=1, chunks=chunks)
    assert rest.length == 8 and rest.positions[0].tolist() == list(range(32, 40)) and rest.sample_at == ((0, 7),)


def test_cancelled_and_expired_requests_retire_and_free_their_rows_in_the_same_plan():
    cancelled, expired, alive = running(0, [1], [2]), queued([3]), running(1, [4], [5])
    cancelled.cancelled = True
    expired.deadline, alive.deadline = 10.0, 10.5
    waiting = queued([6, 7])
    p = plan([cancelled, alive], [expired, waiting], batch=2, now=10.0)
    assert p.retired == ((expired, "timeout"), (cancelled, "cancelled"))
    assert p.admitted == ((0, waiting),)  # the cancelled request's row, the expired one never admitted
    assert [row for row, _ in p.running] == [0, 1]
    assert plan([None, alive], batch=2, now=10.5).retired == ((alive, "timeout"),)


def test_nothing_to_run_is_an_empty_plan():
    p = plan([None, None], batch=2)
    assert p.running == () and p.admitted == () and p.retired == () and not np.any(p.positions != NO_POSITION)


def test_a_group_of_rows_is_planned_on_its_own_under_its_row_numbers():
    """Rows 2 and 3 as a group (first_row=2): the plan names rows 2 and 3, its inputs are the group's
    two rows; control: the same slice planned as rows 0 and 1."""
    decoder, newcomer = running(3, [4, 5], [6]), queued([1, 2, 3])
    group = plan_step([None, decoder], [newcomer], shapes(batch=4), 2, True, 0.0, first_row=2)
    assert group.admitted == ((2, newcomer),) and [row for row, _ in group.running] == [2, 3]
    assert group.input_ids.shape == (2, 8) and group.input_ids[1, 0] == 6 and group.positions[1, 0] == 2
    assert group.fed == ((2, 3),) and group.sample_at == ((2, 2), (3, 0))
    alone = plan_step([None, decoder], [newcomer], shapes(batch=4), 2, True, 0.0)
    assert [row for row, _ in alone.running] == [0, 1]
