"""The engine in a process of its own, and the HTTP front's handle on it: one pipe, one message per step.

In one process the event loop's per-token work (Starlette, SSE writes) holds the GIL the engine
thread needs between ORT runs, so with B rows it adds to every step. Here the child process steps
the Engine on its only thread and, after each step, sends the front one JSON message with every
row's new tokens and ended requests; the front reads it on its event loop (one wake-up per step for
all streams) and feeds the same `Request` objects the app consumes in process. The front checks a
request (prompt, options, queue bound: RequestError / QueueFull / EngineClosed at once, as the
in-process engine does) before it crosses; a cancel (a client gone) crosses and frees the row at
the child's next step. The child ignores SIGINT (the front drains it: `close(grace)`) and ends when
the pipe closes. JSON, never pickle; no torch on either side for ORT.

    python3 -m serving.engine_process FD SPEC   # started by EngineProcess, not by hand
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

from mixtral_export.errors import UserError
from mixtral_export.runtimes.engine import Engine, EngineClosed, QueueFull, Request
from mixtral_export.runtimes.generate import Completion, Row, TokenEvent, check_prompts, position_limit
from mixtral_export.runtimes.load import load_step_manifest
from mixtral_export.runtimes.session import generation_config
from mixtral_export.runtimes.step import RequestError

START_SECONDS = 600  # a large artifact on a busy machine takes minutes to open


class EngineStartError(UserError, RuntimeError):
    """The engine process could not open the artifact (its own one-line reason)."""


class EngineProcess:
    """What the app needs of a Session (submit, tokenizer, encode, encode_chat, `engine` state, close),
    with the engine stepping in a child process. Submit from the event loop that consumes the requests."""

    def __init__(self, artifact: str | Path, runtime: str = "ort", provider: str = "cpu", threads: int | None = None,
                 checkpoint: str | Path | None = None, max_queue: int | None = None, rows: int | None = None):
        manifest = load_step_manifest(artifact)
        self.manifest, self.shapes = manifest, manifest.shapes
        if rows is not None and not 1 <= rows <= self.shapes.batch:
            raise RequestError(f"rows must be in 1..{self.shapes.batch} (the batch), got {rows}")
        if max_queue is not None and max_queue < 0:
            raise RequestError(f"max_queue must be >= 0, got {max_queue}")
        self.rows, self.max_queue = rows or self.shapes.batch, max_queue
        self.limit = position_limit(self.shapes.max_positions, manifest.config.max_position_embeddings)
        self.tokenizer = None
        if manifest.tokenizer:
            from mixtral_export.tokenizer import Tokenizer

            self.tokenizer = Tokenizer.from_file(manifest.path(manifest.tokenizer))
        self.closed = False
        self.busy_rows = self.queue_depth = 0  # as of the child's last step
        self.requests: dict[int, Request] = {}  # submitted, not yet ended
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        ours, theirs = socket.socketpair()
        spec = {"artifact": str(artifact), "runtime": runtime, "provider": provider, "threads": threads,
                "checkpoint": None if checkpoint is None else str(checkpoint), "rows": rows}
        self.process = subprocess.Popen([sys.executable, "-m", "mixtral_export.serving.engine_process", str(theirs.fileno()),
                                         json.dumps(spec)], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.engine_pid = self._started()

    def _started(self) -> int:
        deadline = time.monotonic() + START_SECONDS
        while not self.conn.poll(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise EngineStartError(f"the engine process exited (code {self.process.wait()}) before it was ready")
        message = json.loads(self.conn.recv_bytes())
        if "failed" in message:
            self.process.wait(30)
            raise EngineStartError(message["failed"])
        return message["ready"]

    @property
    def engine(self) -> "EngineProcess":
        """The engine's state as the app reads it (limit, rows, shapes, closed, busy_rows, queue_depth)."""
        return self

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=True)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode_chat(messages)

    def submit(self, prompt_ids: list[int], index: int = 0, timeout: float | None = None, **options) -> Request:
        """Check and queue one prompt (Session.submit's options); consume the Request on this event loop."""
        ids = [int(t) for t in prompt_ids]
        check_prompts([ids], self.shapes.vocab_size, self.limit)
        config = generation_config(self.manifest.eos_token_id, **options)
        if config.stop_strings and self.tokenizer is None:
            raise RequestError("stop_strings are matched on decoded text: they need a tokenizer")
        if timeout is not None and not timeout > 0:
            raise RequestError(f"timeout must be > 0 seconds, got {timeout!r}")
        if self.closed:
            raise EngineClosed("the engine is shutting down")
        if self.max_queue is not None and len(self.requests) - self.rows >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); try again later")
        self._listen()
        rid = next(self._ids)
        request = Request(Row(index, ids, list(ids), None), config, None, None, lambda: self._cancel(rid))
        self.requests[rid] = request
        self._send({"submit": rid, "prompt": ids, "options": options, "timeout": timeout})
        return request

    def _cancel(self, rid: int) -> None:
        if rid in self.requests:
            self._send({"cancel": rid})

    def _send(self, message: dict) -> None:
        with self._send_lock:
            self.conn.send_bytes(json.dumps(message).encode())

    def _listen(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self.conn.fileno(), self._receive)

    def _receive(self) -> None:
        """Every message that has arrived (usually one step's), then one wake-up per touched request."""
        touched: dict[int, Request] = {}
        try:
            while self.conn.poll():
                self._apply(json.loads(self.conn.recv_bytes()), touched)
        except (EOFError, OSError):  # the engine process is gone
            self._loop.remove_reader(self.conn.fileno())
            self.closed = True
            for rid, request in self.requests.items():
                request._end(None, RuntimeError("the engine process exited"), wake=False)
                touched[rid] = request
            self.requests.clear()
        for request in touched.values():
            if request._waiter is not None:
                request._waiter[1].set()

    def _apply(self, message: dict, touched: dict[int, Request]) -> None:
        self.busy_rows, self.queue_depth = message["busy"], message["queue"]
        for rid, token, text in message["events"]:
            request = touched[rid] = self.requests[rid]
            request._events.put(TokenEvent(request.row.index, token, text))
        for rid, tokens, text, reason, error in message["ends"]:
            request = touched[rid] = self.requests.pop(rid)
            completion = None if error else Completion(request.row.prompt, tokens, text, reason)
            request._end(completion, RuntimeError(error) if error else None, wake=False)

    def close(self, grace: float = 0.0) -> None:
        """Stop admitting; the child lets running requests finish for `grace` s, cancels the rest, exits."""
        self.closed = True
        try:
            self._send({"close": grace})
        except OSError:
            pass
        try:
            self.process.wait(grace + 30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# ---- the child ----

def serve_pipe(conn: Connection, engine: Engine, eos_token_ids: tuple[int, ...], tokenizer) -> None:
    """Step the engine on this thread; between steps take the front's messages (blocking when idle),
    after each step send what changed in one message. Returns once closed and drained."""
    requests: dict[int, Request] = {}
    ends: list[list] = []  # [rid, token_ids, text, finish_reason, error or None]
    reported, closing_at = None, None
    while True:
        wait = 0 if engine.waiting or engine.busy_rows or closing_at is not None else None
        while conn.poll(wait):
            wait = 0
            message = json.loads(conn.recv_bytes())  # EOFError: the front is gone
            if "submit" in message:
                rid = message["submit"]
                try:
                    config = generation_config(eos_token_ids, **message["options"])
                    detokenizer = tokenizer.stream_decoder() if tokenizer is not None else None
                    requests[rid] = engine.submit(message["prompt"], config, detokenizer, timeout=message["timeout"])
                except (RequestError, EngineClosed, QueueFull) as error:  # a submit racing the close
                    ends.append([rid, [], None, "cancelled", str(error)])
            elif "cancel" in message:
                if (request := requests.get(message["cancel"])) is not None:
                    request.cancelled = True
            elif "close" in message:
                engine.closed, closing_at = True, time.monotonic() + message["close"]
        drained = not (engine.waiting or engine.busy_rows)
        if closing_at is not None and (drained or time.monotonic() >= closing_at):
            engine.stop()  # cancels what is left; the step below retires it
        engine.step()
        events = []
        for rid, request in list(requests.items()):
            if request.slot is None and not request.ended.is_set():
                continue  # still queued: nothing to say yet
            try:
                got, ended = request.poll()
                error = None
            except Exception as failure:  # the step that ended it failed
                got, ended, error = [], True, f"{type(failure).__name__}: {failure}"
            events += [[rid, event.token_id, event.text_delta] for event in got]
            if ended:
                del requests[rid]
                done = request.completion
                ends.append([rid, [], None, "cancelled", error] if error else
                            [rid, done.token_ids, done.text, done.finish_reason, None])
        state = (engine.busy_rows, engine.queue_depth)
        if events or ends or state != reported:
            conn.send_bytes(json.dumps({"busy": state[0], "queue": state[1], "events": events, "ends": ends}).encode())
            ends, reported = [], state
        if closing_at is not None and not requests and not (engine.waiting or engine.busy_rows):
            return


def main() -> None:
    fd, spec = int(sys.argv[1]), json.loads(sys.argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the whole group: the front drains us
    conn = Connection(fd)
    try:
        from mixtral_export.runtimes.load import open_step_backend

        backend, manifest = open_step_backend(spec["artifact"], spec["runtime"], provider=spec["provider"],
                                              threads=spec["threads"], checkpoint=spec["checkpoint"])
        tokenizer = None
        if manifest.tokenizer:
            from mixtral_export.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_file(manifest.path(manifest.tokenizer))
        engine = Engine(backend, rows=spec["rows"], max_positions=manifest.config.max_position_embeddings)
    except Exception as error:  # UserError and whatever opening a backend raises: one line to the front
        conn.send_bytes(json.dumps({"failed": str(error) or type(error).__name__}).encode())
        sys.exit(2)
    conn.send_bytes(json.dumps({"ready": os.getpid()}).encode())
    try:
        serve_pipe(conn, engine, manifest.eos_token_id, tokenizer)
    except (EOFError, OSError):  # the front went away: nobody to answer
        engine.stop()
        engine.step()


if __name__ == "__main__":
    main()
