"""What a request asks and returns, how it is admitted, and the engine's state of one request.

Pure numpy. A *request* is one prompt's generation; its *index* is the prompt's position in the
list a caller gave (generate/stream, one HTTP body); a *batch row* is an index 0..B-1 of the
static graph, which the engine lends a request while it runs. An EOS token is kept in token_ids
(as transformers does) but contributes no text; a stop string ends the request, its text is cut
before the stop string, and the token that completed it is kept.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal, Protocol

import numpy as np

from mixtral_export.runtimes.logprobs import MAX_TOP_LOGPROBS, TokenLogprob
from mixtral_export.runtimes.sampling import Sampler, SamplingParams
from mixtral_export.runtimes.step import ContextOverflow, RequestError

FinishReason = Literal["eos", "grammar", "stop_string", "length", "cache_full", "cancelled", "timeout"]
# "grammar": the request's grammar is complete and admits no further token (OpenAI's "stop")


class QueueFull(RuntimeError):
    """The engine's queue is at its bound: the request is refused at once (HTTP 429), not kept waiting."""


class OptionError(RequestError):
    """A request option this engine cannot take (a token id beyond its vocabulary); `option` names it."""

    def __init__(self, message: str, option: str):
        super().__init__(message)
        self.option = option


class EngineClosed(RuntimeError):
    """The engine is shutting down and admits nothing new."""


class Detokenizer(Protocol):
    """Incremental decode of one request: push returns completed text only; flush returns the rest."""

    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


DetokenizerFactory = Callable[[], Detokenizer]


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    logprobs: int | None = None  # None = off; k = each token's log-probability and its k best alternatives
    grammar: str | None = None  # llguidance's Lark dialect (runtimes/constraint.py); None = unconstrained

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
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise RequestError(f"logprobs must be None or an integer in 0..{MAX_TOP_LOGPROBS} (alternatives per "
                               f"token), got {self.logprobs!r}")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise RequestError(f"grammar must be None or a non-empty Lark grammar, got {self.grammar!r}")

    def to_json(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "sampling": asdict(self.sampling),
                "eos_token_ids": [int(t) for t in self.eos_token_ids], "stop_strings": list(self.stop_strings),
                "logprobs": self.logprobs, "grammar": self.grammar}

    @classmethod
    def from_json(cls, data: dict) -> "GenerationConfig":
        return cls(max_new_tokens=data["max_new_tokens"], sampling=SamplingParams(**data["sampling"]),
                   eos_token_ids=tuple(data["eos_token_ids"]), stop_strings=tuple(data["stop_strings"]),
                   logprobs=data.get("logprobs"), grammar=data.get("grammar"))


def generation_config(eos_token_ids: tuple[int, ...], max_new_tokens: int = 32, temperature: float = 0.0,
                      top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                      stop_strings: tuple[str, ...] = (), logprobs: int | None = None, presence_penalty: float = 0.0,
                      frequency_penalty: float = 0.0, logit_bias=(), grammar: str | None = None) -> GenerationConfig:
    """A request's options (Session.submit's keywords) checked into its GenerationConfig (RequestError);
    `logit_bias` maps token ids to biases (a dict, or (id, bias) pairs); `grammar` constrains the output
    (llguidance's Lark dialect; runtimes/json_grammar.py makes one from a JSON schema)."""
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, seed=seed, presence_penalty=presence_penalty,
                              frequency_penalty=frequency_penalty, logit_bias=logit_bias)
    return GenerationConfig(max_new_tokens=max_new_tokens, sampling=sampling, eos_token_ids=eos_token_ids,
                            stop_strings=tuple(stop_strings), logprobs=logprobs, grammar=grammar)


@dataclass(frozen=True)
class TokenEvent:
    index: int  # the request's prompt index
    token_id: int
    text_delta: str  # "" without a detokenizer; all deltas of a request concatenate to its final text
    logprob: TokenLogprob | None = None  # when the request asked for logprobs


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]  # generated ids, the EOS or stop-string-completing token included
    text: str | None  # None without a detokenizer
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for them


@dataclass
class GenerationResult:
    completions: list[Completion]
    prefill_seconds: float
    decode_seconds: float
    prefill_tokens: int  # real prompt tokens, padding excluded
    decode_steps: int  # T=1 backend steps

    @property
    def decode_tokens(self) -> int:
        """Tokens sampled from decode-step logits (each request's first token comes from prefill)."""
        return sum(len(c.token_ids) for c in self.completions) - len(self.completions)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    def to_json(self, **extra) -> dict:
        return {**extra,
                "completions": [completion_json(c) for c in self.completions],
                "prefill_tokens": self.prefill_tokens, "prefill_seconds": self.prefill_seconds,
                "decode_tokens": self.decode_tokens, "decode_steps": self.decode_steps,
                "decode_seconds": self.decode_seconds,
                "prefill_tokens_per_second": self.prefill_tokens_per_second,
                "decode_tokens_per_second": self.decode_tokens_per_second}


def completion_json(completion: Completion) -> dict:
    data = vars(completion).copy()
    if completion.logprobs is not None:
        data["logprobs"] = [entry.to_json() for entry in completion.logprobs]
    return data


def position_limit(*limits: int | None) -> int | None:
    known = [n for n in limits if n is not None]
    return min(known) if known else None


def token_budget(prompt_length: int, config: GenerationConfig, limit: int | None) -> int:
    """Tokens a request may generate at most: its max_new_tokens, or fewer when the position limit comes first."""
    return config.max_new_tokens if limit is None else max(0, min(config.max_new_tokens, limit - prompt_length + 1))


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


@dataclass(frozen=True)
class Admission:
    """What an engine admits, checked in this one place by every engine client: the batch rows it may
    use, the position limit, the vocabulary and the queue bound."""

    batch: int  # the graph's batch rows
    vocab_size: int
    limit: int | None  # the position limit (the cache's and the model's; None = unbounded)
    max_rows: int  # busy rows at most (1 = one request at a time: the serialized baseline)
    max_queue: int | None = None  # requests waiting for a row at most (None = unbounded)
    grammars: object = field(default=None, compare=False)  # runtimes/constraint.py Grammars; None: no tokenizer

    def __post_init__(self) -> None:
        if not 1 <= self.max_rows <= self.batch:
            raise RequestError(f"max_rows must be in 1..{self.batch} (the batch), got {self.max_rows}")
        if self.max_queue is not None and self.max_queue < 0:
            raise RequestError(f"max_queue must be >= 0, got {self.max_queue}")

    @classmethod
    def of(cls, shapes, max_positions: int | None = None, max_rows: int | None = None,
           max_queue: int | None = None, grammars=None) -> "Admission":
        """From a backend's StepShapes; `max_positions` is the model's position embeddings; `grammars`
        (runtimes/constraint.py) compiles requests' grammars with the artifact's tokenizer."""
        return cls(shapes.batch, shapes.vocab_size, position_limit(shapes.max_positions, max_positions),
                   shapes.batch if max_rows is None else max_rows, max_queue, grammars)

    def check(self, prompt, config: GenerationConfig, decodes: bool, timeout: float | None, closed: bool,
              waiting: int) -> list[int]:
        """The prompt's ids, or RequestError for a bad request, EngineClosed / QueueFull when refused.
        `decodes`: the request has a detokenizer; `waiting`: requests already waiting for a row."""
        ids = [int(t) for t in prompt]
        check_prompts([ids], self.vocab_size, self.limit)
        bias = config.sampling.logit_bias
        if bias and bias[-1][0] >= self.vocab_size:
            raise OptionError(f"logit_bias has token id {bias[-1][0]}, outside the vocabulary (0..{self.vocab_size - 1})",
                              "logit_bias")
        if config.stop_strings and not decodes:
            raise RequestError("stop_strings are matched on decoded text: they need a detokenizer "
                               "(the artifact's tokenizer)")
        if timeout is not None and not timeout > 0:
            raise RequestError(f"timeout must be > 0 seconds, got {timeout!r}")
        if closed:
            raise EngineClosed("the engine is shutting down")
        if self.max_queue is not None and waiting >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); try again later")
        return ids

    def constrain(self, ids: list[int], config: GenerationConfig):
        """The request's Constraint (runtimes/constraint.py), None without a grammar; RequestError for a
        grammar that does not compile or cannot end within the request's tokens."""
        if config.grammar is None:
            return None
        if self.grammars is None:
            raise OptionError("a grammar constrains tokens by their text: it needs the artifact's tokenizer "
                              "(tokenizer.model)", "grammar")
        return self.grammars.constraint(config.grammar, token_budget(len(ids), config, self.limit))


class RequestState:
    """The engine's state of one request (written by the engine's stepping thread only): its tokens,
    text, where it runs, and how it ends. `handle` is where its events go (a RequestHandle)."""

    def __init__(self, index: int, prompt: list[int], config: GenerationConfig, detokenizer: Detokenizer | None = None,
                 sampler=None, timeout: float | None = None, handle=None, constraint=None):
        self.index, self.prompt, self.config, self.detokenizer = index, prompt, config, detokenizer
        self.constraint = constraint  # the grammar's matcher (runtimes/constraint.py), None = unconstrained
        self.sampler = sampler or Sampler(config.sampling, prompt_length=len(prompt))
        self.deadline = time.monotonic() + timeout if timeout is not None else None
        self.handle = handle
        self.ids = list(prompt)  # prompt + generated; the last one is fed at position len(ids) - 1
        self.fed = 0  # prompt tokens already through the backend
        self.row: int | None = None  # the batch row it was admitted to (None while queued)
        self.cancelled = False
        self.text = ""
        self.emitted = 0  # characters of text already yielded
        self.finish_reason: FinishReason | None = None
        self.logprobs: list[TokenLogprob] | None = [] if config.logprobs is not None else None
        self.steps: list[tuple[int, bool, float]] = []  # (engine step, a prefill step?, seconds)

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)

    def add(self, token: int, limit: int | None, logprob: TokenLogprob | None = None) -> str:
        """Append a sampled token (and its logprob), decide whether the request ends; returns the text to yield now."""
        self.ids.append(token)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        if token in self.config.eos_token_ids:
            self.finish_reason = "eos"
        elif self.constraint is not None and self.constraint.complete:
            self.finish_reason = "grammar"
        elif len(self.ids) - len(self.prompt) >= self.config.max_new_tokens:
            self.finish_reason = "length"
        elif limit is not None and len(self.ids) - 1 >= limit:
            self.finish_reason = "cache_full"
        if self.detokenizer is None:
            return ""
        piece = "" if self.finish_reason == "eos" else self.detokenizer.push(token)
        if self.finish_reason is not None:
            piece += self.detokenizer.flush()
        return self.extend(piece, self.config.stop_strings)

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
                          finish_reason=self.finish_reason, logprobs=self.logprobs)


def held_back(text: str, emitted: int, stops: tuple[str, ...]) -> int:
    """Length of the longest unyielded suffix of text that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text) - emitted), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest
