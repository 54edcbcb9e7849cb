"""Generation for every backend: what a request asks and returns, one row's state, and the batch driver.

Pure numpy. The loop itself is runtimes/engine.py (continuous batching over the batch rows);
`generate`/`stream` here submit a list of prompts to a private Engine and step it on the caller's
thread until all are done: a prompt takes the next free row, is prefilled in chunks, then decoded.
An EOS token is kept in token_ids (as transformers does) but contributes no text; a stop string
ends the row, its text is cut before the stop string, and the token that completed it is kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generator, Literal, Protocol, Sequence

import numpy as np

from mixtral_export.runtimes.sampling import SamplingParams
from mixtral_export.runtimes.step import ContextOverflow, RequestError, StepBackend

FinishReason = Literal["eos", "stop_string", "length", "cache_full", "cancelled", "timeout"]


class Detokenizer(Protocol):
    """Incremental decode of one row: push returns completed text only; flush returns the rest."""

    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


DetokenizerFactory = Callable[[], Detokenizer]


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens <= 0:
            raise RequestError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.sampling, SamplingParams):
            raise RequestError(f"sampling must be SamplingParams, got {type(self.sampling).__name__}")
        if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0 for t in self.eos_token_ids):
            raise RequestError(f"eos_token_ids must be token ids >= 0, got {self.eos_token_ids!r}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise RequestError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")


@dataclass(frozen=True)
class TokenEvent:
    row: int  # index into the prompts list
    token_id: int
    text_delta: str  # "" without a detokenizer; all deltas of a row concatenate to its final text


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]  # generated ids, the EOS or stop-string-completing token included
    text: str | None  # None without a detokenizer
    finish_reason: FinishReason


@dataclass
class GenerationResult:
    completions: list[Completion]
    prefill_seconds: float
    decode_seconds: float
    prefill_tokens: int  # real prompt tokens, padding excluded
    decode_steps: int  # T=1 backend steps

    @property
    def decode_tokens(self) -> int:
        """Tokens sampled from decode-step logits (each row's first token comes from prefill)."""
        return sum(len(c.token_ids) for c in self.completions) - len(self.completions)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    def to_json(self, **extra) -> dict:
        return {**extra,
                "completions": [vars(c).copy() for c in self.completions],
                "prefill_tokens": self.prefill_tokens, "prefill_seconds": self.prefill_seconds,
                "decode_tokens": self.decode_tokens, "decode_steps": self.decode_steps,
                "decode_seconds": self.decode_seconds,
                "prefill_tokens_per_second": self.prefill_tokens_per_second,
                "decode_tokens_per_second": self.decode_tokens_per_second}


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
    rows = [[int(t) for t in p] for p in prompts]
    limit = position_limit(backend.shapes.max_positions, max_positions)
    check_prompts(rows, backend.shapes.vocab_size, limit)
    if config.stop_strings and detokenizer_factory is None:
        raise RequestError("stop_strings are matched on decoded text: they need a detokenizer_factory")
    from mixtral_export.runtimes.engine import Engine  # the engine imports this module's types

    engine = Engine(backend, max_positions=limit, ride_along=False)  # decode timings stay pure T=1 steps
    return engine.drive([engine.submit(prompt, config, detokenizer_factory() if detokenizer_factory else None,
                                       index=index) for index, prompt in enumerate(rows)])


def position_limit(*limits: int | None) -> int | None:
    known = [n for n in limits if n is not None]
    return min(known) if known else None


def check_prompts(prompts: list[list[int]], vocab_size: int, limit: int | None) -> None:
    if not prompts:
        raise RequestError("no prompts to generate from")
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise RequestError(f"prompt {index} is empty")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"prompt {index} has token id {bad[0]}, outside the vocabulary (0..{vocab_size - 1})")
        if limit is not None and len(prompt) > limit:
            raise ContextOverflow(f"prompt {index} is {len(prompt)} tokens long; the limit is {limit} positions")


@dataclass
class Row:
    """One prompt's generation state; text is tracked only with a detokenizer."""

    index: int
    prompt: list[int]
    ids: list[int]  # prompt + generated; the last one is fed at position len(ids) - 1
    detokenizer: Detokenizer | None
    text: str = ""
    emitted: int = 0  # characters of text already yielded
    finish_reason: FinishReason | None = None

    def add(self, token: int, config: GenerationConfig, limit: int | None) -> str:
        """Append a sampled token, decide whether the row ends; returns the text to yield now."""
        self.ids.append(token)
        if token in config.eos_token_ids:
            self.finish_reason = "eos"
        elif len(self.ids) - len(self.prompt) >= config.max_new_tokens:
            self.finish_reason = "length"
        elif limit is not None and len(self.ids) - 1 >= limit:
            self.finish_reason = "cache_full"
        if self.detokenizer is None:
            return ""
        piece = "" if self.finish_reason == "eos" else self.detokenizer.push(token)
        if self.finish_reason is not None:
            piece += self.detokenizer.flush()
        return self.extend(piece, config.stop_strings)

    def extend(self, piece: str, stops: tuple[str, ...]) -> str:
        """Add decoded text, cut at a completed stop string, hold back a possible stop prefix."""
        seen = len(self.text)
        self.text += piece
        if stops:
            start = max(0, seen - max(map(len, stops)) + 1)  # earlier text held no complete stop
            hits = [at for at in (self.text.find(s, start) for s in stops) if at >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.finish_reason = "stop_string"
        end = len(self.text) if self.finish_reason else len(self.text) - held_back(self.text, self.emitted, stops)
        delta, self.emitted = self.text[self.emitted:end], end
        return delta

    def completion(self) -> Completion:
        return Completion(prompt_ids=self.prompt, token_ids=self.ids[len(self.prompt):],
                          text=self.text if self.detokenizer is not None else None,
                          finish_reason=self.finish_reason)


def held_back(text: str, emitted: int, stops: tuple[str, ...]) -> int:
    """Length of the longest unyielded suffix of text that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text) - emitted), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest
