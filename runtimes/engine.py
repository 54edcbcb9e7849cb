"""The one generation loop: an engine that lends the B static batch rows to requests (continuous batching).

Requests arrive at any time from any thread (`submit`), wait in a bounded queue, and are admitted
to a free batch row at the next step; the row's cache is cleared first (`backend.reset(rows=[row])`),
since the step contract's mask shows a query every slot whose position is >= 0 and <= its own.
Each step is planned by runtimes/scheduler.py (which requests retire, which are admitted to which
rows, the chunk length T and what each row is fed), then run: backend step, sampling, and a commit
that turns the sampled tokens into events and retires the requests that ended. A request leaves at
EOS, max tokens, a stop string, the position limit, cancellation or its deadline, freeing its row
for the next in the queue. With `ride_along` (serving) decoders join prefill steps; without it (the
batch driver of generate.py, whose prefill and decode timings must stay apart) they sit them out.

Over a backend whose rows are groups that can be in flight together (runtimes/step.py's
GroupedStepBackend: a pipeline with row groups), each group is planned, started and landed on its
own: while the stages run the other groups, the engine samples and commits one group and starts
its next step. Every request is fed and sampled exactly as with all rows in one step.

Driven two ways: `step()`/`drive()` from the caller's thread (generate.stream, verify), or `start()`
for one background stepping thread (runtimes/engine_client.py's InprocessClient). `submit` returns a
RequestHandle, the caller's side of the request; the engine's own RequestState stays in here.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Generator, Iterable

from mixtral_export.runtimes.constraint import Grammars, constrained_token
from mixtral_export.runtimes.engine_client import RequestHandle, result_of, wake_consumers
from mixtral_export.runtimes.requests import (Admission, Detokenizer, GenerationConfig, GenerationResult, RequestState,
                                              TokenEvent)
from mixtral_export.runtimes.logprobs import token_logprobs
from mixtral_export.runtimes.sampling import next_tokens
from mixtral_export.runtimes.scheduler import StepPlan, plan_step
from mixtral_export.runtimes.step import StepBackend


class Engine:
    """Continuous batching over one StepBackend: its B batch rows run one request each."""

    def __init__(self, backend: StepBackend, max_queue: int | None = None, max_positions: int | None = None,
                 ride_along: bool = True, max_rows: int | None = None, tokenizer=None):
        """`max_rows` caps the busy rows (1 = one request at a time: the serialized baseline); `tokenizer`
        (the artifact's) lets requests carry a grammar (runtimes/constraint.py)."""
        self.backend, self.shapes = backend, backend.shapes
        grammars = None if tokenizer is None else Grammars(tokenizer, backend.shapes.vocab_size)
        self.admission = Admission.of(backend.shapes, max_positions, max_rows, max_queue, grammars)
        self.ride_along = ride_along
        self.rows: list[RequestState | None] = [None] * self.shapes.batch  # each batch row's request
        self.waiting: deque[RequestState] = deque()
        self.lock = threading.Condition()
        self.closed = False
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.steps = 0
        # rows in groups in flight together (a GroupedStepBackend): each group's steps started and
        # landed in turn, while the other groups' run; None: every step all rows
        grouped = getattr(backend, "groups", 1) > 1 and hasattr(backend, "start_group")
        self.group_rows: int | None = backend.group_rows if grouped else None
        self.in_flight: deque[tuple[int, StepPlan, object, float]] = deque()  # (group, plan, ticket, started)

    @property
    def limit(self) -> int | None:
        """The position limit: the cache's and the model's."""
        return self.admission.limit

    # ---- any thread ----

    def submit(self, prompt: Iterable[int], config: GenerationConfig, detokenizer: Detokenizer | None = None,
               index: int = 0, timeout: float | None = None, sampler=None) -> RequestHandle:
        """Queue one prompt; raises RequestError for a bad one, QueueFull / EngineClosed when refused."""
        with self.lock:
            ids = self.admission.check(prompt, config, detokenizer is not None, timeout, self.closed,
                                       len(self.waiting))
        constraint = self.admission.constrain(ids, config)  # outside the lock: compiling takes milliseconds
        with self.lock:
            if constraint is not None:  # closed, or the queue filled, while it compiled
                self.admission.check(ids, config, detokenizer is not None, timeout, self.closed, len(self.waiting))
            state = RequestState(index, ids, config, detokenizer, sampler, timeout, constraint=constraint)
            state.handle = RequestHandle(index, ids, lambda: self.cancel(state))
            self.waiting.append(state)
            self.lock.notify_all()
        return state.handle

    def cancel(self, state: RequestState) -> None:
        """End a request at the next step (no-op once ended)."""
        with self.lock:
            state.cancelled = True
            self.lock.notify_all()

    def row_of(self, handle: RequestHandle) -> int | None:
        """The batch row a request runs in; None while it is queued and once it has ended."""
        return next((row for row, state in enumerate(self.rows) if state is not None and state.handle is handle), None)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def busy_rows(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def cache_span(self) -> int:
        """The cache slots the backend's last step attended over (a span of the ring, or all S of it)."""
        return int(getattr(self.backend, "span", self.shapes.cache_slots))

    def start(self) -> "Engine":
        """Run `step` on one background thread until `close`."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._serve, name="engine", daemon=True)
            self.thread.start()
        return self

    def stop_admitting(self) -> None:
        with self.lock:
            self.closed = True

    def close(self, grace: float = 0.0) -> None:
        """Stop admitting; let queued and running requests finish for up to `grace` s, cancel the rest."""
        self.stop_admitting()
        end = time.monotonic() + grace
        while self.thread is not None and time.monotonic() < end and (self.waiting or self.busy_rows):
            time.sleep(0.02)
        self._cancel_all()
        if self.thread is None:
            while self.step():  # retires the cancelled ones (once the groups in flight land)
                pass
        else:
            self.stop()
            self.thread.join()

    def stop(self) -> None:
        """Tell the stepping thread to end once nothing is left (cancelled requests end at its next
        step); does not wait, so a garbage-collected Session can call it from any thread."""
        with self.lock:
            self.closed = self.stopping = True
        self._cancel_all()

    def _cancel_all(self) -> None:
        with self.lock:
            for state in [*self.waiting, *filter(None, self.rows)]:
                state.cancelled = True
            self.lock.notify_all()

    def stop_and_wait(self, timeout: float = 10.0) -> None:
        """`stop`, then wait for the stepping thread (unless called on it): at interpreter exit a
        thread still inside a torch or ORT step aborts the process ("terminate called ...")."""
        self.stop()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    # ---- the stepping thread ----

    def _serve(self) -> None:
        while True:
            with self.lock:
                while not (self.waiting or self.busy_rows or self.stopping):
                    self.lock.wait()
                if self.stopping and not (self.waiting or self.busy_rows):
                    return
            self.step()

    def drive(self, handles: list[RequestHandle]) -> Generator[TokenEvent, None, GenerationResult]:
        """Step on the caller's thread until `handles` end, yielding their events; their result."""
        pending = list(handles)
        while pending:
            for handle in pending:
                yield from handle.poll()[0]
            pending = [h for h in pending if not h.drained]
            if pending:
                self.step()
        for handle in handles:
            handle.result()  # raises a step error
        return result_of(handles)

    def step(self) -> bool:
        """Plan, run one backend step over the planned rows, sample, commit; False when there was nothing to do.
        Over a backend with row groups in flight (GroupedStepBackend) one group's step: `_step_group`."""
        if self.group_rows is not None:
            return self._step_group()
        plan = self._plan(0, self.shapes.batch)
        if plan is None:
            return False
        started = time.perf_counter()
        try:
            logits = self.backend.step(plan.input_ids, plan.positions)  # (B, T, V)
        except Exception as error:  # a failed step ends every request in it, never the engine
            self._fail(plan, error)
            return True
        self._land(plan, logits, 0, started)
        return True

    def _step_group(self) -> bool:
        """Start the step of every group not in flight that has rows to run (start_group returns at
        once: the stages work on it behind the groups already in flight), then wait for the oldest
        group's logits and sample and commit them; False when no group has anything to do."""
        rows, flying = self.group_rows, {group for group, *_ in self.in_flight}
        for group in range(self.backend.groups):
            plan = None if group in flying else self._plan(group * rows, rows)
            if plan is None:
                continue
            try:
                ticket = self.backend.start_group(group, plan.input_ids, plan.positions)  # (B, T) of the group
            except Exception as error:
                self._fail(plan, error)
                continue
            self.in_flight.append((group, plan, ticket, time.perf_counter()))
        if not self.in_flight:
            return False
        group, plan, ticket, started = self.in_flight.popleft()
        try:
            logits = self.backend.finish_group(ticket)  # (B, T, V) of the group
        except Exception as error:
            self._fail(plan, error)
            return True
        self._land(plan, logits, group * rows, started)
        return True

    def _plan(self, first: int, count: int) -> StepPlan | None:
        """Plan rows [first, first + count) (retire, admit, clear the admitted rows' cache, feed); the
        plan, or None when none of them runs."""
        cap = min(count, max(0, self.admission.max_rows - first))  # max_rows counts from row 0
        with self.lock:
            plan = plan_step(self.rows[first:first + count], self.waiting, self.shapes, cap, self.ride_along,
                             time.monotonic(), first)
            self._start(plan)
        if plan.admitted:
            try:
                self.backend.reset(rows=[row for row, _ in plan.admitted])
            except Exception as error:  # a stage that died: the step's requests end with it, never the engine
                self._fail(plan, error)
                return None
        if not plan.running:
            return None
        running = dict(plan.running)
        for row, count_fed in plan.fed:
            running[row].fed += count_fed
        return plan

    def _land(self, plan: StepPlan, logits, first: int, started: float) -> None:
        """Sample the planned rows' next tokens from the step's logits (rows first, first + 1, ...) and commit."""
        running = dict(plan.running)
        sampled = [running[row] for row, _ in plan.sample_at]
        try:
            at = [row - first for row, _ in plan.sample_at], [column for _, column in plan.sample_at]
            ready = logits[at]  # (n, V)
            tokens = choose_tokens(sampled, ready)
            logprobs = token_logprobs(ready, tokens, [r.config.logprobs for r in sampled])  # of the raw logits
            events = [(r, TokenEvent(r.index, token, r.add(token, self.limit, logprob), logprob))
                      for r, token, logprob in zip(sampled, tokens, logprobs)]
        except Exception as error:
            self._fail(plan, error)
            return
        self._commit(plan, events, time.perf_counter() - started)

    def _fail(self, plan: StepPlan, error: BaseException) -> None:
        """A failed step ends every request in it, never the engine."""
        running = [r for _, r in plan.running]
        with self.lock:
            for r in running:
                self._finish(r, error)
        wake_consumers([r.handle for r in running])

    def _start(self, plan: StepPlan) -> None:
        """Retire and admit as planned (under the lock)."""
        for state, reason in plan.retired:
            state.finish_reason = reason
            if state.row is None:
                self.waiting.remove(state)
            self._finish(state)
        for row, state in plan.admitted:
            self.waiting.remove(state)
            state.row, self.rows[row] = row, state
        wake_consumers([state.handle for state, _ in plan.retired])

    def _commit(self, plan: StepPlan, events: list[tuple[RequestState, TokenEvent]], seconds: float) -> None:
        """Sampled tokens to their handles; the requests that ended leave their rows."""
        for _, r in plan.running:
            r.steps.append((self.steps, plan.prefill, seconds))
        self.steps += 1
        with self.lock:
            for r, event in events:
                r.handle.push(event)
                if r.finish_reason is not None:
                    self._finish(r)
        wake_consumers([r.handle for r, _ in events])

    def _finish(self, state: RequestState, error: BaseException | None = None) -> None:
        if state.row is not None and self.rows[state.row] is state:
            self.rows[state.row] = None
        state.handle.finish(None if error else state.completion(), error, state.steps)


def choose_tokens(rows: list[RequestState], logits) -> list[int]:
    """Each row's next token from its logits (n, V): the unconstrained rows together as ever, each
    constrained row through its grammar's mask (runtimes/constraint.py)."""
    free = [i for i, r in enumerate(rows) if r.constraint is None]
    if len(free) == len(rows):
        return next_tokens([r.sampler for r in rows], logits, [r.ids for r in rows])
    tokens = [0] * len(rows)
    if free:
        chosen = next_tokens([rows[i].sampler for i in free], logits[free], [rows[i].ids for i in free])
        for i, token in zip(free, chosen):
            tokens[i] = token
    for i, r in enumerate(rows):
        if r.constraint is not None:
            tokens[i] = constrained_token(r.sampler, logits[i:i + 1], r.ids, r.constraint)
    return tokens
