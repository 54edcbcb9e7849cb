"""One generation loop for every backend: grouped, left-padded chunked prefill, then T=1 decode.

Pure numpy. Prompts go through in consecutive groups of `shapes.batch` rows (a short last group is
filled with dummy rows fed position -1 only); the backend is reset before each group. Each row of a
group is left-padded (id 0, position -1) to a common multiple of the prefill chunk, so every row's
last prompt token sits in the last column of the last chunk. An EOS token is kept in token_ids (as
transformers does) but contributes no text; a stop string ends the row, its text is cut before the
stop string, and the token that completed it is kept.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Generator, Literal, Protocol, Sequence

import numpy as np

from graphs.contract import NO_POSITION
from runtimes.sampling import Sampler, SamplingParams
from runtimes.step import ContextOverflow, RequestError, StepBackend

FinishReason = Literal["eos", "stop_string", "length", "cache_full"]


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
    return run(backend, rows, config, detokenizer_factory, limit)


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


def run(backend: StepBackend, prompts: list[list[int]], config: GenerationConfig,
        detokenizer_factory: DetokenizerFactory | None,
        limit: int | None) -> Generator[TokenEvent, None, GenerationResult]:
    batch = backend.shapes.batch
    sampler = Sampler(config.sampling)
    completions: list[Completion] = []
    prefill_seconds = decode_seconds = 0.0
    decode_steps = 0
    for first in range(0, len(prompts), batch):
        rows = [Row(index, prompt, list(prompt), detokenizer_factory() if detokenizer_factory else None)
                for index, prompt in enumerate(prompts[first:first + batch], start=first)]
        started = time.perf_counter()
        backend.reset()
        logits = prefill(backend, [row.prompt for row in rows])  # (rows, V)
        events = advance(rows, logits, sampler, config, limit)
        prefill_seconds += time.perf_counter() - started
        yield from events
        while live := [slot for slot, row in enumerate(rows) if row.finish_reason is None]:
            started = time.perf_counter()
            input_ids = np.zeros((batch, 1), dtype=np.int64)  # (B, 1)
            positions = np.full((batch, 1), NO_POSITION, dtype=np.int64)  # (B, 1)
            for slot in live:
                input_ids[slot, 0] = rows[slot].ids[-1]
                positions[slot, 0] = len(rows[slot].ids) - 1
            logits = backend.step(input_ids, positions)[live, 0, :]  # (live, V)
            events = advance([rows[slot] for slot in live], logits, sampler, config, limit)
            decode_seconds += time.perf_counter() - started
            decode_steps += 1
            yield from events
        completions.extend(row.completion() for row in rows)
    return GenerationResult(completions=completions, prefill_seconds=prefill_seconds,
                            decode_seconds=decode_seconds, prefill_tokens=sum(map(len, prompts)),
                            decode_steps=decode_steps)


def prefill(backend: StepBackend, prompts: list[list[int]]) -> np.ndarray:
    """Left-pad the group to a multiple of the chunk, run the chunks; each row's next-token logits."""
    batch, chunk = backend.shapes.batch, backend.shapes.prefill_chunk
    width = -(-max(map(len, prompts)) // chunk) * chunk
    input_ids = np.zeros((batch, width), dtype=np.int64)  # (B, W)
    positions = np.full((batch, width), NO_POSITION, dtype=np.int64)  # (B, W)
    for slot, prompt in enumerate(prompts):
        input_ids[slot, width - len(prompt):] = prompt
        positions[slot, width - len(prompt):] = np.arange(len(prompt))
    for start in range(0, width, chunk):
        logits = backend.step(np.ascontiguousarray(input_ids[:, start:start + chunk]),
                              np.ascontiguousarray(positions[:, start:start + chunk]))  # (B, P, V)
    return logits[:len(prompts), -1, :]  # (rows, V)


def advance(rows: list[Row], logits: np.ndarray, sampler: Sampler, config: GenerationConfig,
            limit: int | None) -> list[TokenEvent]:
    """Sample one token for each live row (logits (rows, V)) and record it."""
    tokens = sampler.next_tokens(logits, [row.ids for row in rows])  # (rows,)
    return [TokenEvent(row.index, int(token), row.add(int(token), config, limit))
            for row, token in zip(rows, tokens)]
