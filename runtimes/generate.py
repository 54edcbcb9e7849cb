"""The batch driver: generate from a list of prompts on one backend, stepping on the caller's thread.

`generate`/`stream` submit the prompts to a private Engine (runtimes/engine.py, the one generation
loop) and step it until all are done: a prompt takes the next free batch row, is prefilled in chunks,
then decoded. What a request asks and returns (GenerationConfig, TokenEvent, Completion,
GenerationResult) is runtimes/requests.py.
"""
from __future__ import annotations

from typing import Callable, Generator, Sequence

from mixtral_export.runtimes.engine import Engine
from mixtral_export.runtimes.requests import (DetokenizerFactory, GenerationConfig, GenerationResult, TokenEvent,
                                              check_prompts, position_limit)
from mixtral_export.runtimes.step import StepBackend


def generate(backend: StepBackend, prompts: Sequence[Sequence[int]], config: GenerationConfig,
             detokenizer_factory: DetokenizerFactory | None = None,
             on_token: Callable[[TokenEvent], None] | None = None,
             max_positions: int | None = None) -> GenerationResult:
    """Run `stream` to the end, handing each event to `on_token`; returns the result."""
    events = stream(backend, prompts, config, detokenizer_factory, max_positions)
    while True:
        try:
            event = next(events)
        except StopIteration as done:
            return done.value
        if on_token is not None:
            on_token(event)


def stream(backend: StepBackend, prompts: Sequence[Sequence[int]], config: GenerationConfig,
           detokenizer_factory: DetokenizerFactory | None = None,
           max_positions: int | None = None) -> Generator[TokenEvent, None, GenerationResult]:
    """Yield a TokenEvent per token as it is produced; the generator returns the GenerationResult
    (`result = yield from stream(...)`, or StopIteration.value). Inputs are checked here, eagerly,
    before any step: RequestError, or ContextOverflow for a prompt longer than the position limit
    (the backend's shapes.max_positions and/or `max_positions`, the model's position embeddings)."""
    checked = [[int(t) for t in p] for p in prompts]
    check_prompts(checked, backend.shapes.vocab_size, position_limit(backend.shapes.max_positions, max_positions))
    engine = Engine(backend, max_positions=max_positions, ride_along=False)  # decode timings stay pure T=1 steps
    handles = [engine.submit(prompt, config, detokenizer_factory() if detokenizer_factory else None, index=index)
               for index, prompt in enumerate(checked)]
    return engine.drive(handles)
