"""The one generation loop: an engine whose B static batch rows are request slots (continuous batching).

Requests arrive at any time from any thread (`submit`), wait in a bounded queue, and are admitted
to a free row at the next step; the row's cache is cleared first (`backend.reset(rows=[slot])`),
since the step contract's mask shows a query every slot whose position is >= 0 and <= its own.
Each step runs every busy row: a row still prefilling feeds its next chunk of up to P prompt tokens
(columns 0..n-1, the rest -1); a decoding row feeds its last token. A step is T = P when any row
prefills, else T = 1. With `ride_along` (serving) a decoding row joins a T = P step with its one
token in column 0: static shapes compute every column anyway, so decoders never stall while a
newcomer prefills. Without it (the batch driver of generate.py, whose prefill and decode timings
must stay apart) decoders sit out prefill steps. A request leaves at EOS, max tokens, a stop string,
the position limit, cancellation or its deadline, freeing its row for the next in the queue.

Driven two ways: `step()`/`drive()` from the caller's thread (generate.stream, verify), or `start()`
for one background stepping thread (Session, the server). A Request is consumed by blocking
iteration or `async for`, with no thread per request.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from typing import Callable, Generator, Iterable, Iterator

import numpy as np

from mixtral_export.artifact.contract import NO_POSITION
from mixtral_export.runtimes.generate import (Completion, Detokenizer, GenerationConfig, GenerationResult, Row, TokenEvent,
                               check_prompts, position_limit)
from mixtral_export.runtimes.sampling import Sampler, next_tokens
from mixtral_export.runtimes.step import RequestError, StepBackend


class QueueFull(RuntimeError):
    """The engine's queue is at its bound: the request is refused at once (HTTP 429), not kept waiting."""


class EngineClosed(RuntimeError):
    """The engine is shutting down and admits nothing new."""


class Request:
    """One submitted prompt: its Row, options and own Sampler, and the queue its events go to.

    Iterate it (blocking) or `async for` it for TokenEvents; `.completion` is set once it ends.
    """

    def __init__(self, row: Row, config: GenerationConfig, sampler, deadline: float | None,
                 wake_engine: Callable[[], None]):
        self.row, self.config, self.sampler, self.deadline = row, config, sampler, deadline
        self.fed = 0  # prompt tokens already through the backend
        self.slot: int | None = None
        self.cancelled = False
        self.completion: Completion | None = None
        self.error: BaseException | None = None
        self.steps: list[tuple[int, bool, float]] = []  # (engine step, a prefill step?, seconds)
        self._events: queue.SimpleQueue = queue.SimpleQueue()  # TokenEvent..., then None at the end
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None  # an `async for` consumer
        self._wake_engine = wake_engine
        self.ended = threading.Event()

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.row.prompt)

    def cancel(self) -> None:
        """Give up: the row is freed at the engine's next step (no-op once ended)."""
        self.cancelled = True
        self._wake_engine()

    def _put(self, item: TokenEvent | None, wake: bool = True) -> None:
        self._events.put(item)
        if wake:
            wake_consumers([self])

    def _end(self, completion: Completion | None, error: BaseException | None = None, wake: bool = True) -> None:
        self.completion, self.error = completion, error
        self.ended.set()
        self._put(None, wake)

    def _item(self, item: TokenEvent | None) -> TokenEvent | None:
        if item is None and self.error is not None:
            raise self.error
        return item

    def poll(self) -> tuple[list[TokenEvent], bool]:
        """Events already produced, without waiting, and whether the request has ended."""
        out = []
        while not self._events.empty():  # this consumer is the only reader: no queue.Empty to raise
            item = self._item(self._events.get_nowait())
            if item is None:
                return out, True
            out.append(item)
        return out, False

    def __iter__(self) -> Iterator[TokenEvent]:
        while (item := self._item(self._events.get())) is not None:
            yield item

    async def batches(self):
        """Lists of the events ready at each wakeup: a consumer that lags gets them together."""
        ready = asyncio.Event()
        self._waiter = asyncio.get_running_loop(), ready
        while True:
            ready.clear()  # a put after this schedules ready.set on the loop
            events, ended = self.poll()
            if events:
                yield events
            if ended:
                return
            if not events:
                await ready.wait()

    async def __aiter__(self):
        async for events in self.batches():
            for event in events:
                yield event

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the end; the Completion (raises the step error that ended it, if any)."""
        if not self.ended.wait(timeout):
            raise TimeoutError("the request has not finished")
        if self.error is not None:
            raise self.error
        return self.completion


class Engine:
    """Continuous batching over one StepBackend: its B rows are request slots."""

    def __init__(self, backend: StepBackend, max_queue: int | None = None, max_positions: int | None = None,
                 ride_along: bool = True, rows: int | None = None):
        """`rows` caps the busy rows (1 = one request at a time: the serialized baseline)."""
        if max_queue is not None and max_queue < 0:
            raise RequestError(f"max_queue must be >= 0, got {max_queue}")
        if rows is not None and not 1 <= rows <= backend.shapes.batch:
            raise RequestError(f"rows must be in 1..{backend.shapes.batch} (the batch), got {rows}")
        self.rows = rows or backend.shapes.batch
        self.backend, self.shapes = backend, backend.shapes
        self.limit = position_limit(backend.shapes.max_positions, max_positions)
        self.max_queue, self.ride_along = max_queue, ride_along
        self.slots: list[Request | None] = [None] * self.shapes.batch
        self.waiting: deque[Request] = deque()
        self.lock = threading.Condition()
        self.closed = False
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.steps = 0

    # ---- any thread ----

    def submit(self, prompt: Iterable[int], config: GenerationConfig, detokenizer: Detokenizer | None = None,
               index: int = 0, timeout: float | None = None, sampler=None) -> Request:
        """Queue one prompt; raises RequestError for a bad one, QueueFull / EngineClosed when refused."""
        ids = [int(t) for t in prompt]
        check_prompts([ids], self.shapes.vocab_size, self.limit)
        if config.stop_strings and detokenizer is None:
            raise RequestError("stop_strings are matched on decoded text: they need a detokenizer_factory")
        if timeout is not None and not timeout > 0:
            raise RequestError(f"timeout must be > 0 seconds, got {timeout!r}")
        deadline = time.monotonic() + timeout if timeout is not None else None
        request = Request(Row(index, ids, list(ids), detokenizer), config, sampler or Sampler(config.sampling),
                          deadline, self.wake)
        with self.lock:
            if self.closed:
                raise EngineClosed("the engine is shutting down")
            if self.max_queue is not None and len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); try again later")
            self.waiting.append(request)
            self.lock.notify_all()
        return request

    def wake(self) -> None:
        with self.lock:
            self.lock.notify_all()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def busy_rows(self) -> int:
        return sum(r is not None for r in self.slots)

    def start(self) -> "Engine":
        """Run `step` on one background thread until `close`."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._serve, name="engine", daemon=True)
            self.thread.start()
        return self

    def close(self, grace: float = 0.0) -> None:
        """Stop admitting; let queued and running requests finish for up to `grace` s, cancel the rest."""
        with self.lock:
            self.closed = True
        end = time.monotonic() + grace
        while self.thread is not None and time.monotonic() < end and (self.waiting or self.busy_rows):
            time.sleep(0.02)
        with self.lock:
            for request in [*self.waiting, *filter(None, self.slots)]:
                request.cancelled = True
            self.lock.notify_all()
        if self.thread is None:
            self.step()  # retires the cancelled ones
        else:
            self.stop()
            self.thread.join()

    def stop(self) -> None:
        """Tell the stepping thread to end once nothing is left (cancelled requests end at its next
        step); does not wait, so a garbage-collected Session can call it from any thread."""
        with self.lock:
            self.closed = self.stopping = True
            for request in [*self.waiting, *filter(None, self.slots)]:
                request.cancelled = True
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

    def drive(self, requests: list[Request]) -> Generator[TokenEvent, None, GenerationResult]:
        """Step on the caller's thread until `requests` end, yielding their events; their result."""
        pending = list(requests)
        while pending:
            for request in pending:
                if request.slot is not None or request.ended.is_set():  # queued ones have nothing yet
                    yield from request.poll()[0]
            pending = [r for r in pending if not r.ended.is_set() or not r._events.empty()]
            if pending:
                self.step()
        for request in requests:
            request.result()  # raises a step error
        return result_of(requests)

    def step(self) -> bool:
        """Admit, run one backend step over the busy rows, sample; False when there was nothing to do."""
        with self.lock:
            self._retire(time.monotonic())
            fresh = self._admit()
            live = [r for r in self.slots if r is not None]
        if fresh:
            self.backend.reset(rows=fresh)
        if not live:
            return False
        started = time.perf_counter()
        prefill = any(r.prefilling for r in live)
        if prefill and not self.ride_along:
            live = [r for r in live if r.prefilling]
        chunk = self.shapes.prefill_length(max(len(r.row.prompt) - r.fed for r in live if r.prefilling)) \
            if prefill else 1  # the shortest served T that holds every prefilling row's next piece
        input_ids = np.zeros((self.shapes.batch, chunk), dtype=np.int64)  # (B, T)
        positions = np.full((self.shapes.batch, chunk), NO_POSITION, dtype=np.int64)  # (B, T)
        sample_at: list[tuple[Request, int]] = []  # (request, chunk column of its next-token logits)
        for r in live:
            if r.prefilling:
                piece = r.row.prompt[r.fed:r.fed + chunk]
                input_ids[r.slot, :len(piece)] = piece
                positions[r.slot, :len(piece)] = np.arange(r.fed, r.fed + len(piece))
                r.fed += len(piece)
                if not r.prefilling:
                    sample_at.append((r, len(piece) - 1))
            else:
                input_ids[r.slot, 0] = r.row.ids[-1]
                positions[r.slot, 0] = len(r.row.ids) - 1
                sample_at.append((r, 0))
        try:
            logits = self.backend.step(input_ids, positions)  # (B, T, V)
            ready = logits[[r.slot for r, _ in sample_at], [column for _, column in sample_at]]  # (n, V)
            tokens = next_tokens([r.sampler for r, _ in sample_at], ready, [r.row.ids for r, _ in sample_at])
            events = [(r, TokenEvent(r.row.index, token, r.row.add(token, r.config, self.limit)))
                      for (r, _), token in zip(sample_at, tokens)]
        except Exception as error:  # a failed step ends every request in it, never the engine
            with self.lock:
                for r in live:
                    self._finish(r, error)
            return True
        seconds = time.perf_counter() - started
        for r in live:
            r.steps.append((self.steps, prefill, seconds))
        self.steps += 1
        with self.lock:
            for r, event in events:
                r._put(event, wake=False)
                if r.row.finish_reason is not None:
                    self._finish(r, wake=False)
        wake_consumers([r for r, _ in events])
        return True

    def _admit(self) -> list[int]:
        fresh = []
        for slot, occupant in enumerate(self.slots[:self.rows]):
            if occupant is None and self.waiting:
                request = self.waiting.popleft()
                request.slot, self.slots[slot] = slot, request
                fresh.append(slot)
        return fresh

    def _retire(self, now: float) -> None:
        """End cancelled and expired requests, queued or in a row."""
        for request in [*self.waiting, *filter(None, self.slots)]:
            if request.cancelled:
                request.row.finish_reason = "cancelled"
            elif request.deadline is not None and now >= request.deadline:
                request.row.finish_reason = "timeout"
            else:
                continue
            if request.slot is None:
                self.waiting.remove(request)
            self._finish(request)

    def _finish(self, request: Request, error: BaseException | None = None, wake: bool = True) -> None:
        if request.slot is not None:
            self.slots[request.slot] = None
        request._end(None if error else request.row.completion(), error, wake)


def wake_consumers(requests: list[Request]) -> None:
    """One call into each `async for` consumer's loop for all its requests: a cross-thread call is a syscall."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
    for request in requests:
        if request._waiter is not None:
            by_loop.setdefault(request._waiter[0], []).append(request._waiter[1])
    for loop, readies in by_loop.items():
        try:
            loop.call_soon_threadsafe(set_all, readies)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening
            pass


def set_all(readies: list[asyncio.Event]) -> None:
    for ready in readies:
        ready.set()


def result_of(requests: list[Request]) -> GenerationResult:
    """Counts and timings over the steps any of `requests` took part in (each step counted once)."""
    steps = {index: (prefill, seconds) for r in requests for index, prefill, seconds in r.steps}
    return GenerationResult(completions=[r.completion for r in requests],
                            prefill_seconds=sum(s for p, s in steps.values() if p),
                            decode_seconds=sum(s for p, s in steps.values() if not p),
                            prefill_tokens=sum(len(r.row.prompt) for r in requests),
                            decode_steps=sum(not p for p, _ in steps.values()))
