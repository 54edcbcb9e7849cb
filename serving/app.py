"""The OpenAI-compatible HTTP app over one engine client (its engine's batch rows serve concurrent requests).

Routes: POST /v1/completions, POST /v1/chat/completions (both with "stream": true as server-sent
events), GET /v1/models, GET /health, GET /metrics. Errors have OpenAI's body
{"error": {"message", "type", "param", "code"}}: 400 for a bad request, 401 without the API key (if
one is set), 404 for an unknown model or route, 413 for a body over the limit, 429 when the engine's
queue is full, 503 while shutting down or restarting the engine. A client that disconnects
cancels its requests, which frees their rows at the next step. No torch on this path.
"""
from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from mixtral_export.runtimes.engine_client import EngineClient, RequestHandle
from mixtral_export.runtimes.requests import EngineClosed, OptionError, QueueFull, generation_config
from mixtral_export.runtimes.step import RequestError
from mixtral_export.serving.bounded_stream import STALL_SECONDS, BoundedStream
from mixtral_export.serving.guards import CountResponses, OpenResponses, RequireApiKey
from mixtral_export.serving.metrics import ServerMetrics
from mixtral_export.serving.openai_api import (BadRequest, Grouper, Job, LogprobsWriter, choice_options, chunk, delta_event,
                                               error_body, parse, response, sse_text as sse, usage_chunk)
from mixtral_export.serving.tools_api import ToolCallHold, call_deltas, marker_id, tool_answer

DISCONNECT_POLL_SECONDS = 0.25
MAX_BODY_BYTES = 4 * 2**20  # a request body beyond this gets 413 (a long prompt is ~100 kB of JSON)


def build_app(client: EngineClient, tokenizer, eos_token_ids: tuple[int, ...], model_name: str,
              request_timeout: float | None = None, replica: str | None = None,
              stream_interval: int = 1, api_key: str | None = None, max_body: int = MAX_BODY_BYTES,
              stall_seconds: float = STALL_SECONDS) -> FastAPI:
    """The app over an engine client, in process or not; `tokenizer` (None: the artifact has none) encodes
    prompts. The caller owns the client (and closes it: see serving/server.py). `replica` names this
    copy in an `x-replica` header and /health (Ray Serve runs several). A stream sends its first token
    at once, then a chunk per `stream_interval` tokens (each chunk is a socket write on the event loop,
    the serving cost per token: see docs/serving.md). With `api_key` every route but /health needs it
    (serving/guards.py); a body over `max_body` bytes gets 413; a stream
    whose client reads nothing for `stall_seconds` is cut (serving/bounded_stream.py); `app.state.responses` counts the responses still being written."""
    if isinstance(stream_interval, bool) or not isinstance(stream_interval, int) or stream_interval < 1:
        raise RequestError(f"stream_interval must be an integer >= 1 (tokens per streamed chunk), got {stream_interval!r}")
    app = FastAPI(title="mixtral-export", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics(client)
    limit = client.admission.limit
    default_chat_tokens = 512 if limit is None else limit  # chat without max_tokens: up to the context
    app.state.client, app.state.metrics, app.state.responses = client, metrics, OpenResponses()
    app.add_middleware(CountResponses, responses=app.state.responses)
    if api_key:
        app.add_middleware(RequireApiKey, api_key=api_key)  # added last: runs first
    headers = {"x-replica": replica} if replica else None
    has_text = tokenizer is not None  # without one, a token's text is its id: "12 "

    def refuse(status: int, message: str, kind: str, outcome: str, param=None, code=None) -> JSONResponse:
        metrics.requests.labels(outcome).inc()
        return JSONResponse(error_body(message, kind, param, code), status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(_, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(error.detail), kind), status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, error: RequestValidationError):
        return JSONResponse(error_body(str(error)), status_code=400)

    async def read_body(http: HttpRequest) -> bytes | None:
        """The body, or None once it is over `max_body` (refused by its Content-Length before any is read)."""
        declared = http.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body:
            return None
        body = bytearray()
        async for piece in http.stream():
            body += piece
            if len(body) > max_body:
                return None
        return bytes(body)

    async def serve(kind: str, http: HttpRequest):
        if (raw := await read_body(http)) is None:
            return refuse(413, f"the request body is over {max_body} bytes", "invalid_request_error", "too_large")
        try:
            body = json.loads(raw)
        except ValueError:
            return refuse(400, "the request body is not valid JSON", "invalid_request_error", "bad_request")
        try:
            job = parse(kind, body, tokenizer, model_name, default_chat_tokens)
        except BadRequest as error:
            return refuse(400, str(error), "invalid_request_error", "bad_request", error.param)
        if job.model != model_name:
            return refuse(404, f"the model {job.model!r} does not exist; this server serves {model_name!r}",
                          "invalid_request_error", "bad_request", "model", "model_not_found")
        requests: list[RequestHandle] = []
        try:
            for index, prompt in enumerate(job.prompts):
                config = generation_config(eos_token_ids, **choice_options(job, index))
                requests.append(client.submit(prompt, config, index=index, timeout=request_timeout))
        except QueueFull as error:
            cancel(requests)
            return refuse(429, str(error), "rate_limit_error", "rejected_queue_full", code="queue_full")
        except EngineClosed as error:
            cancel(requests)
            return refuse(503, str(error), "service_unavailable", "rejected_shutting_down")
        except RequestError as error:  # too long for the context, bad token ids, ...
            cancel(requests)
            param = error.option if isinstance(error, OptionError) else "prompt"
            param = job.grammar_param or param if param == "grammar" else param
            return refuse(400, str(error), "invalid_request_error", "bad_request", param)
        metrics.prompt_tokens.inc(sum(map(len, job.prompts)))
        if job.stream:
            return BoundedStream(stream(job, requests[0]), stall_seconds, metrics.stalled_streams.inc,
                                 media_type="text/event-stream", headers=headers)
        watcher = asyncio.create_task(watch_disconnect(http, requests))
        try:
            completions = await asyncio.gather(*(collect(r) for r in requests))
        except Exception as error:  # a failed backend step
            return refuse(500, f"generation failed: {error}", "server_error", "error")
        finally:
            watcher.cancel()
            cancel(requests)
        return JSONResponse(response(job, completions, tokenizer), headers=headers)

    async def collect(request: RequestHandle):
        async for _ in timed(request):
            pass
        metrics.requests.labels(request.completion.finish_reason).inc()
        return request.completion

    async def timed(request: RequestHandle):
        """The request's events as they reach the loop, in batches (tokens that arrived together go out
        in one chunk); observes time to first token and the gaps between tokens as the loop saw them."""
        last = start = time.perf_counter()
        async for events in request.batches():
            now = time.perf_counter()
            (metrics.itl if last != start else metrics.ttft).observe(now - last)
            for _ in events[1:]:
                metrics.itl.observe(0.0)
            last = now
            metrics.generated_tokens.inc(len(events))
            yield events

    async def stream(job: Job, request: RequestHandle):
        """SSE: text deltas, a last chunk with the finish reason, usage if asked, [DONE]. A dropped
        connection cancels the generator here, which cancels the request."""
        try:
            if job.kind == "chat":
                yield sse(chunk(job, "", first=True))  # the role, as OpenAI sends it first
            grouper = Grouper(stream_interval)
            writer = LogprobsWriter(job.kind, tokenizer) if job.options["logprobs"] is not None else None
            unsent = []  # (token id, TokenLogprob) of tokens whose text has not gone out yet

            def delta(text: str) -> str:  # the fast template path unless logprobs ride along
                if writer is None:
                    return delta_event(job, text)
                out = sse(chunk(job, text, logprobs=writer.body(unsent)))
                unsent.clear()
                return out

            calls = ToolCallHold(marker_id(tokenizer)) if job.tools is not None and job.tools.calls_allowed else None
            async for events in timed(request):
                if calls is not None:  # from a [TOOL_CALLS] token on, held until the answer is read
                    events = calls.pass_on(events)
                text = "".join(event.text_delta if has_text else f"{event.token_id} " for event in events)
                unsent.extend((event.token_id, event.logprob) for event in events)
                if text := grouper.add(text, len(events)):
                    yield delta(text)
            completion = request.completion
            metrics.requests.labels(completion.finish_reason).inc()
            usage = sse(usage_chunk(job, completion)) if job.include_usage else ""
            answer = None if calls is None else tool_answer(completion.token_ids, tokenizer, job.tools)
            if answer is None and calls is not None:  # no valid calls: what was held is plain text
                grouper.add("".join(event.text_delta for event in calls.held), len(calls.held))
                unsent.extend((event.token_id, event.logprob) for event in calls.held)
            text = grouper.rest()
            end = delta(text) if text or (writer is not None and unsent and answer is None) else ""
            if answer is not None:
                unsent.extend((event.token_id, event.logprob) for event in calls.held)
                for d in call_deltas(answer):
                    end += sse(chunk(job, None, delta=d, logprobs=writer.body(unsent) if writer and unsent else None))
                    unsent.clear()
            finish = "tool_calls" if answer is not None else completion.finish_reason
            yield end + sse(chunk(job, None, finish)) + usage + "data: [DONE]\n\n"  # one write
        except (asyncio.CancelledError, GeneratorExit):  # how a dropped client reaches us depends on Starlette
            metrics.requests.labels("disconnected").inc()
            raise
        except Exception as error:  # a failed backend step: tell the client in-band
            metrics.requests.labels("error").inc()
            yield sse(error_body(f"generation failed: {error}", "server_error")) + "data: [DONE]\n\n"
        finally:
            request.cancel()

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await serve("completion", http)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await serve("chat", http)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "mixtral-export"}]}

    @app.get("/health")
    async def health():
        state = "closing" if client.closed else client.state
        return JSONResponse({"status": state, "restarts": client.restarts, "busy_rows": client.busy_rows,
                             "batch_rows": client.admission.batch, "queue_depth": client.queue_depth,
                             "cache_span": client.cache_span,
                             "replica": replica},
                            status_code=200 if state == "ok" else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def cancel(requests: list[RequestHandle]) -> None:
    for request in requests:
        request.cancel()


async def watch_disconnect(http: HttpRequest, requests: list[RequestHandle]) -> None:
    """Cancel a non-streamed request whose client went away (its row frees at the next step)."""
    while not await http.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)
    cancel(requests)
