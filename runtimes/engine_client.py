"""One interface to an engine, wherever it steps: the `EngineClient` protocol, the `RequestHandle` a
caller holds, and the in-process client (the engine stepping on a thread of this process).

The process client (runtimes/engine_process.py) steps the engine in a child process instead; a
server holds either through this protocol. A handle is the caller's side of a request: it receives
TokenEvents and the Completion from whoever produces them (the engine, or the process client reading
the pipe) through `push` / `finish`; the engine's own state of the request (runtimes/requests.py's
RequestState) stays inside the engine. A handle is consumed by blocking iteration or `async for`,
with no thread per request.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from typing import Callable, Iterator, Protocol

from mixtral_export.runtimes.requests import Admission, Completion, GenerationConfig, GenerationResult, TokenEvent


class RequestHandle:
    """One submitted prompt as its caller sees it: iterate it (blocking) or `async for` it for
    TokenEvents; `.completion` is set once it ends; `cancel()` gives up."""

    def __init__(self, index: int, prompt_ids: list[int], cancel: Callable[[], None]):
        self.index, self.prompt_ids = index, prompt_ids
        self.completion: Completion | None = None
        self.error: BaseException | None = None
        self.steps: list[tuple[int, bool, float]] = []  # (engine step, a prefill step?, seconds), known at the end
        self.ended = threading.Event()
        self._cancel = cancel
        self._events: queue.SimpleQueue = queue.SimpleQueue()  # TokenEvent..., then None at the end
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None  # an `async for` consumer

    # ---- the producer's side ----

    def push(self, event: TokenEvent) -> None:
        """A new token; the consumer is woken by `wake_consumers` (one call per loop for many handles)."""
        self._events.put(event)

    def finish(self, completion: Completion | None, error: BaseException | None = None,
               steps: list[tuple[int, bool, float]] = ()) -> None:
        """The end: its Completion, or the error that ended it (raised to the consumer)."""
        self.completion, self.error, self.steps = completion, error, list(steps)
        self.ended.set()
        self._events.put(None)

    # ---- the consumer's side ----

    def cancel(self) -> None:
        """Give up: the row is freed at the engine's next step (no-op once ended)."""
        if not self.ended.is_set():
            self._cancel()

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

    @property
    def drained(self) -> bool:
        """Ended, and every event taken."""
        return self.ended.is_set() and self._events.empty()

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


def wake_consumers(handles: list[RequestHandle]) -> None:
    """One call into each `async for` consumer's loop for all its handles: a cross-thread call is a syscall."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
    for handle in handles:
        if handle._waiter is not None:
            by_loop.setdefault(handle._waiter[0], []).append(handle._waiter[1])
    for loop, readies in by_loop.items():
        try:
            loop.call_soon_threadsafe(set_all, readies)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening
            pass


def set_all(readies: list[asyncio.Event]) -> None:
    for ready in readies:
        ready.set()


def result_of(handles: list[RequestHandle]) -> GenerationResult:
    """Counts and timings over the steps any of `handles` took part in (each step counted once)."""
    steps = {index: (prefill, seconds) for h in handles for index, prefill, seconds in h.steps}
    return GenerationResult(completions=[h.completion for h in handles],
                            prefill_seconds=sum(s for p, s in steps.values() if p),
                            decode_seconds=sum(s for p, s in steps.values() if not p),
                            prefill_tokens=sum(len(h.prompt_ids) for h in handles),
                            decode_steps=sum(not p for p, _ in steps.values()))


class EngineClient(Protocol):
    """What a server or a Session needs of an engine, in process or not."""

    admission: Admission  # the batch, the rows it may use, the position limit, the queue bound

    def submit(self, prompt_ids: list[int], config: GenerationConfig, index: int = 0,
               timeout: float | None = None) -> RequestHandle:
        """Queue one prompt: RequestError for a bad one, QueueFull / EngineClosed when refused."""

    def cancel(self, handle: RequestHandle) -> None:
        """End a request at the engine's next step (what `handle.cancel()` calls)."""

    def close(self, grace: float = 0.0) -> None:
        """Stop admitting; running requests get `grace` seconds to finish, then are cancelled."""

    @property
    def closed(self) -> bool: ...

    @property
    def state(self) -> str:
        """"ok" while it serves; "restarting" / "failed" for a supervised engine process that died."""

    @property
    def restarts(self) -> int:
        """Engines started after the first died (always 0 in process)."""

    @property
    def busy_rows(self) -> int: ...

    @property
    def queue_depth(self) -> int: ...

    @property
    def cache_span(self) -> int:
        """The cache slots the engine's last step attended over (artifact/contract.py: spans)."""


class InprocessClient:
    """The engine stepping on one background thread of this process (a Session's, `serve --in-process`).

    Takes a runtimes/engine.py Engine; its thread ends at `close`, or when the client is dropped
    (`stop_and_wait`, for a garbage-collected Session)."""

    def __init__(self, engine, detokenizer_factory=None):
        self.engine, self.detokenizer_factory = engine, detokenizer_factory
        self.admission = engine.admission
        engine.start()

    def submit(self, prompt_ids: list[int], config: GenerationConfig, index: int = 0,
               timeout: float | None = None) -> RequestHandle:
        detokenizer = self.detokenizer_factory() if self.detokenizer_factory else None
        return self.engine.submit(prompt_ids, config, detokenizer, index=index, timeout=timeout)

    def cancel(self, handle: RequestHandle) -> None:
        handle.cancel()

    def close(self, grace: float = 0.0) -> None:
        self.engine.close(grace)

    def stop_and_wait(self, timeout: float = 10.0) -> None:
        self.engine.stop_and_wait(timeout)

    @property
    def closed(self) -> bool:
        return self.engine.closed

    state = "ok"  # the engine is this process: it never restarts
    restarts = 0

    @property
    def busy_rows(self) -> int:
        return self.engine.busy_rows

    @property
    def queue_depth(self) -> int:
        return self.engine.queue_depth

    @property
    def cache_span(self) -> int:
        return self.engine.cache_span
