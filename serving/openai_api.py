"""The OpenAI wire format: a request body checked into a Job, completions into response bodies.

Fields mean what they mean in the OpenAI API: `model`, `prompt` (text, token ids, or a list of
either: one choice each) or `messages` (encoded like `generate --chat`), `max_tokens`
(`max_completion_tokens` for chat), `temperature` (default 1), `top_p`, `stop` (up to 4 strings,
cut from the text), `seed`, `stream` (+ `stream_options.include_usage`), `user` (accepted, unused),
chat's `tools`, `tool_choice` and `parallel_tool_calls` (serving/tools_api.py),
`logprobs` (chat: a bool, with `top_logprobs` 0..20; completions: an int 0..5: the model's
log-softmax of the raw logits, runtimes/logprobs.py), `logit_bias`, `presence_penalty`,
`frequency_penalty` (OpenAI's definitions, runtimes/sampling.py), `n` (each choice its own
request; with `seed`, choice 0 draws from the seed and choice i from one derived from it) and
`response_format` (`text`; `json_object`, any JSON object; `json_schema`, JSON valid against its
`schema`: constrained decoding, runtimes/constraint.py and runtimes/json_grammar.py). Any other
field, or an unimplemented one set to anything but its "off" value, is refused rather than ignored.
Anything a client can get wrong raises BadRequest (HTTP 400) with the parameter it names.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from mixtral_export.runtimes.json_grammar import json_grammar
from mixtral_export.runtimes.logprobs import MAX_TOP_LOGPROBS, TokenLogprob
from mixtral_export.runtimes.requests import Completion
from mixtral_export.runtimes.step import RequestError
from mixtral_export.serving.tools_api import ToolRequest, marker_id, message, tool_answer, tool_request, writes_tools
from mixtral_export.tool_calls import Function, ToolFormatError

COMPLETION_DEFAULT_MAX_TOKENS = 16  # the OpenAI default for /v1/completions
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions' `logprobs` bound (OpenAI's)
MAX_CHOICES = 128  # `n` at most (OpenAI's bound)
COMMON_FIELDS = frozenset({"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options",
                           "user", "n", "logit_bias", "presence_penalty", "frequency_penalty", "response_format"})
RESPONSE_FORMATS = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}  # their members
JSON_SCHEMA_MEMBERS = frozenset({"name", "description", "schema", "strict"})
FIELDS = {"completion": COMMON_FIELDS | {"prompt", "logprobs"},
          "chat": COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools",
                                   "tool_choice", "parallel_tool_calls"}}  # the fields each endpoint reads
OFF = {"best_of": (1,), "echo": (False,), "suffix": ("",)}  # not implemented: the values that
# mean "off" (None always does); any other field not in FIELDS is refused whatever its value
FINISH_REASONS = {"eos": "stop", "grammar": "stop", "stop_string": "stop", "length": "length", "cache_full": "length",
                  "cancelled": "length", "timeout": "length"}  # OpenAI knows only stop / length here


class BadRequest(RequestError):
    """A request body the API refuses (HTTP 400); `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Job:
    kind: str  # "completion" | "chat"
    model: str
    prompts: list[list[int]]  # one per choice: each prompt n times in a row
    options: dict  # generation_config keyword options (Session.submit's); `choice_options` gives a choice's
    stream: bool = False
    include_usage: bool = False
    n: int = 1  # choices per prompt
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    delta_frame: tuple[str, str] | None = None  # the SSE text around a delta's JSON string, made once
    tools: ToolRequest | None = None  # chat's tool fields (None: the request has none)
    grammar_param: str | None = None  # the field a grammar came from (what a refused grammar's 400 names)


def delta_event(job: Job, text: str) -> str:
    """The SSE event of one text delta: a template filled with the JSON-escaped text (per token: cheap)."""
    if job.delta_frame is None:
        marker = "\u0000marker\u0000"
        before, after = sse_text(chunk(job, marker)).split(json.dumps(marker))
        job.delta_frame = before, after
    return job.delta_frame[0] + json.dumps(text) + job.delta_frame[1]


class Grouper:
    """A stream's text let out at its first token, then once `interval` tokens have gathered: each
    streamed chunk is a socket write on the event loop, the server's main cost per token."""

    def __init__(self, interval: int):
        self.interval, self.held, self.tokens, self.sent = interval, "", 0, False

    def add(self, text: str, tokens: int) -> str:
        """The text to send now ("" = hold it)."""
        self.held += text
        self.tokens += tokens
        if not self.held or (self.sent and self.tokens < self.interval):
            return ""
        out, self.held, self.tokens, self.sent = self.held, "", 0, True
        return out

    def rest(self) -> str:
        out, self.held, self.tokens = self.held, "", 0
        return out


def sse_text(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def parse(kind: str, body, tokenizer, served_model: str, default_max_tokens: int) -> Job:
    """Check an OpenAI request body; the Job to run. `tokenizer` (None: the artifact has none) encodes
    text and chat messages."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required: a model name from /v1/models", "model")
    refuse_unimplemented(kind, body)
    tools = None
    if kind == "chat":
        try:
            tools = tool_request(body)
        except ToolFormatError as error:
            raise BadRequest(str(error), error.param) from None
        if tools is not None and tools.functions and not writes_tools(tokenizer):
            raise BadRequest(f"'tools' need a tokenizer with tool tokens in the v3 format (Mixtral-8x22B's); this "
                             f"model's is {getattr(tokenizer, 'instruct_version', 'missing')}", "tools")
        prompts = [chat_prompt(body.get("messages"), tokenizer, tools.functions if tools else ())]
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = default_max_tokens if max_tokens is None else max_tokens
    else:
        prompts = text_prompts(body.get("prompt"), tokenizer)
        max_tokens = body.get("max_tokens", COMPLETION_DEFAULT_MAX_TOKENS)
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    stream = checked(body, "stream", bool, False)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    if stream and len(prompts) > 1:
        raise BadRequest("streaming takes one prompt per request", "prompt")
    n = 1 if body.get("n") is None else bounded(body["n"], "n", 1, MAX_CHOICES)
    if stream and n > 1:
        raise BadRequest("streaming takes one choice per request (n = 1)", "n")
    options = dict(max_new_tokens=integer(max_tokens, "max_tokens", low=1),
                   temperature=number(body, "temperature", 1.0, 0.0, 2.0),
                   top_p=number(body, "top_p", 1.0, 0.0, 1.0),
                   seed=None if body.get("seed") is None else integer(body["seed"], "seed"),
                   stop_strings=stops(body.get("stop")), logprobs=logprobs(kind, body),
                   presence_penalty=number(body, "presence_penalty", 0.0, -2.0, 2.0),
                   frequency_penalty=number(body, "frequency_penalty", 0.0, -2.0, 2.0),
                   logit_bias=logit_bias(body.get("logit_bias")))
    if options["top_p"] == 0:
        raise BadRequest("'top_p' must be > 0", "top_p")
    grammar, grammar_param = response_format(body.get("response_format")), "response_format"
    forced = tools.grammar(marker_id(tokenizer)) if tools is not None and tools.calls_allowed else None
    if forced is not None:
        if grammar is not None:
            raise BadRequest("'response_format' and a forced tool call ('tool_choice' 'required' or a named "
                             "function) both constrain the answer: ask for one", "response_format")
        grammar, grammar_param = forced, "tool_choice"
    if grammar is not None:
        options["grammar"] = grammar
    return Job(kind, model, [p for p in prompts for _ in range(n)], options, stream,
               bool(stream_options.get("include_usage", False)), n, tools=tools,
               grammar_param=None if grammar is None else grammar_param)


def response_format(value) -> str | None:
    """The grammar `response_format` asks for: None for text; any JSON object for json_object; JSON
    valid against json_schema.schema (strict or not, the output always validates). Unknown types or
    members are refused, naming them."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in RESPONSE_FORMATS:
        kind = value.get("type") if isinstance(value, dict) else value
        raise BadRequest(f"'response_format' type {kind!r} is not supported: use one of "
                         f"{', '.join(RESPONSE_FORMATS)}", "response_format")
    kind = value["type"]
    unknown = sorted(set(value) - RESPONSE_FORMATS[kind])
    if unknown:
        raise BadRequest(f"'response_format' of type {kind!r} has no member {unknown[0]!r}", "response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_grammar(None)
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise BadRequest("'response_format.json_schema' must be an object with a 'name' and a 'schema'",
                         "response_format")
    unknown = sorted(set(spec) - JSON_SCHEMA_MEMBERS)
    if unknown:
        raise BadRequest(f"'response_format.json_schema' has no member {unknown[0]!r}", "response_format")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise BadRequest("'response_format.json_schema.name' must be a non-empty string", "response_format")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise BadRequest("'response_format.json_schema.strict' must be a boolean", "response_format")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise BadRequest("'response_format.json_schema.schema' must be a JSON schema object", "response_format")
    return json_grammar(schema)


def choice_options(job: Job, choice: int) -> dict:
    """The generation options of choice `choice` (its index among all the job's choices): with a seed,
    choice 0 draws from it and choice i > 0 from a seed derived from (seed, i), so each is reproducible
    and the choices differ."""
    seed = job.options["seed"]
    if seed is None or choice == 0:
        return job.options
    return {**job.options, "seed": int(np.random.SeedSequence([seed, choice]).generate_state(1)[0])}


def logit_bias(value) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} with biases in [-100, 100]; (id, bias) pairs."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise BadRequest("'logit_bias' must be an object mapping token ids to biases", "logit_bias")
    pairs = []
    for key, bias in value.items():
        if not key.isdigit() or isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise BadRequest(f"'logit_bias' maps token ids to numbers in [-100, 100], got {key!r}: {bias!r}",
                             "logit_bias")
        pairs.append((int(key), float(bias)))
    return tuple(pairs)


def refuse_unimplemented(kind: str, body: dict) -> None:
    """A field this endpoint does not implement, unless it is None or its "off" value: BadRequest naming
    it (a client that asked for JSON output or tools must not get free text instead)."""
    for name, value in body.items():
        if name in FIELDS[kind] or value is None or value in OFF.get(name, ()):
            continue
        if name in OFF:
            raise BadRequest(f"'{name}' = {value!r} is not supported by this server", name)
        raise BadRequest(f"'{name}' is not supported by this server", name)


def logprobs(kind: str, body: dict) -> int | None:
    """The alternatives per token to report (None = no logprobs): chat's `top_logprobs` when `logprobs`
    is true; completions' `logprobs` integer."""
    if kind == "chat":
        top = body.get("top_logprobs")
        if not checked(body, "logprobs", bool, False):
            if top is not None:
                raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
            return None
        return 0 if top is None else bounded(top, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    value = body.get("logprobs")
    return None if value is None else bounded(value, "logprobs", 0, MAX_COMPLETION_LOGPROBS)


def bounded(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"'{name}' must be an integer in {low}..{high}, got {value!r}", name)
    return value


def checked(body: dict, name: str, kind: type, default):
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise BadRequest(f"'{name}' must be a {kind.__name__}, got {value!r}", name)
    return value


def integer(value, name: str, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        raise BadRequest(f"'{name}' must be an integer{f' >= {low}' if low is not None else ''}, got {value!r}", name)
    return value


def number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise BadRequest(f"'{name}' must be a number in [{low}, {high}], got {value!r}", name)
    return float(value)


def stops(value) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > 4 or not all(isinstance(s, str) and s for s in items):
        raise BadRequest("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    return tuple(items)


def text_prompts(prompt, tokenizer) -> list[list[int]]:
    """A string, a list of token ids, or a list of either: one prompt per choice."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise BadRequest("'prompt' is required: a string, a list of token ids, or a list of either", "prompt")
    out = []
    for item in prompt:
        if isinstance(item, str):
            if tokenizer is None:
                raise BadRequest("this artifact has no tokenizer.model: send the prompt as token ids", "prompt")
            out.append(tokenizer.encode(item, bos=True))
        elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            out.append(list(item))
        else:
            raise BadRequest("'prompt' items must be strings or non-empty lists of token ids", "prompt")
    return out


def chat_prompt(messages, tokenizer, functions: tuple[Function, ...] = ()) -> list[int]:
    """The ids of chat `messages` (OpenAI's shapes: tool calls and tool results too) with `functions`
    available; a field that is None (or an empty list) counts as absent."""
    if tokenizer is None:
        raise BadRequest("this artifact has no tokenizer.model: chat needs one; use /v1/completions with "
                         "token ids", "messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' is required: a non-empty list of {role, content}", "messages")
    plain = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest("each message must be an object with a 'role' and a 'content'", "messages")
        message = {name: value for name, value in message.items()
                   if value is not None and (value != [] or name == "content")}  # [] = no tool calls
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text ones, joined as mistral-common joins them
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest("only text content parts are supported", "messages")
            message["content"] = "\n\n".join(p["text"] for p in content if p["text"])
        elif content is None and message["role"] != "assistant":
            raise BadRequest("a message's 'content' must be a string", "messages")
        plain.append(message)
    try:
        return tokenizer.encode_chat(plain, tools=functions)
    except ValueError as error:  # the tokenizer's ChatFormatError: roles out of order, unknown role
        raise BadRequest(str(error), "messages") from None


def text_of(completion: Completion) -> str:
    """The completion's text; without a tokenizer, its token ids as "12 7 " (like Session.stream_ids)."""
    return completion.text if completion.text is not None else "".join(f"{t} " for t in completion.token_ids)


def token_surface(tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token's text as OpenAI reports it, and its UTF-8 bytes: the piece with "\u2581" as a space, a
    byte piece that is no character by itself as "bytes:\\xNN", without a tokenizer its id ("12 ")."""
    piece = f"{token_id} " if tokenizer is None else tokenizer.piece[token_id]
    if isinstance(piece, int):  # a byte piece
        return (chr(piece) if piece < 0x80 else f"bytes:\\x{piece:02x}"), [piece]
    text = piece.replace("\u2581", " ")
    return text, list(text.encode())


class LogprobsWriter:
    """The `logprobs` object of one choice in OpenAI's shape, for all its tokens at once or chunk by
    chunk (a completion's `text_offset` runs on across chunks: offsets into its tokens' texts)."""

    def __init__(self, kind: str, tokenizer):
        self.kind, self.tokenizer, self.offset = kind, tokenizer, 0

    def body(self, tokens: list[tuple[int, TokenLogprob]]) -> dict:
        """`tokens`: (token id, its TokenLogprob) in order."""
        if self.kind == "chat":
            return {"content": [{**self.entry(token, entry.logprob),
                                 "top_logprobs": [self.entry(t, p) for t, p in entry.top]}
                                for token, entry in tokens], "refusal": None}
        texts = [token_surface(self.tokenizer, token)[0] for token, _ in tokens]
        offsets = []
        for text in texts:
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": texts, "token_logprobs": [entry.logprob for _, entry in tokens],
                "top_logprobs": [{**{token_surface(self.tokenizer, t)[0]: p for t, p in entry.top}, text: entry.logprob}
                                 for text, (_, entry) in zip(texts, tokens)],  # the sampled token too, as OpenAI
                "text_offset": offsets}

    def entry(self, token: int, logprob: float) -> dict:
        text, raw = token_surface(self.tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": raw}


def usage(prompts: list[list[int]], completions: list[Completion], n: int = 1) -> dict:
    """Each distinct prompt's tokens once (`prompts` holds each n times), every choice's tokens."""
    prompt = sum(map(len, prompts[::n]))
    generated = sum(len(c.token_ids) for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def response(job: Job, completions: list[Completion], tokenizer=None) -> dict:
    """The whole (non-streamed) response body; `tokenizer` names the tokens of logprobs."""
    logprobs = [None if c.logprobs is None else LogprobsWriter(job.kind, tokenizer).body(list(zip(c.token_ids, c.logprobs)))
                for c in completions]
    if job.kind == "chat":
        answers = [tool_answer(c.token_ids, tokenizer, job.tools) for c in completions]
        choices = [{"index": n, "message": {"role": "assistant", "content": text_of(c)} if a is None else message(a),
                    "logprobs": logprobs[n], "finish_reason": "tool_calls" if a else FINISH_REASONS[c.finish_reason]}
                   for n, (c, a) in enumerate(zip(completions, answers))]
    else:
        choices = [{"index": n, "text": text_of(c), "logprobs": logprobs[n],
                    "finish_reason": FINISH_REASONS[c.finish_reason]} for n, c in enumerate(completions)]
    return {"id": prefix(job) + job.id, "object": "chat.completion" if job.kind == "chat" else "text_completion",
            "created": job.created, "model": job.model, "choices": choices,
            "usage": usage(job.prompts, completions, job.n)}


def chunk(job: Job, text: str | None, finish: str | None = None, first: bool = False,
          logprobs: dict | None = None, delta: dict | None = None) -> dict:
    """One streamed chunk: a text delta (with its tokens' `logprobs` object), another chat `delta` (tool
    calls), or (text None) the end with its finish reason (ours, or "tool_calls")."""
    if job.kind == "chat":
        if delta is None:
            delta = {} if text is None else ({"role": "assistant", "content": text} if first else {"content": text})
        choice = {"index": 0, "delta": delta, "logprobs": logprobs,
                  "finish_reason": FINISH_REASONS.get(finish, finish) if finish else None}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": logprobs,
                  "finish_reason": FINISH_REASONS[finish] if finish else None}
    return {"id": prefix(job) + job.id, "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
            "created": job.created, "model": job.model, "choices": [choice]}


def usage_chunk(job: Job, completion: Completion) -> dict:
    return {"id": prefix(job) + job.id, "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
            "created": job.created, "model": job.model, "choices": [], "usage": usage(job.prompts, [completion])}


def prefix(job: Job) -> str:
    return "chatcmpl-" if job.kind == "chat" else "cmpl-"


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
