"""The process engine client: the engine in a child process of its own, one pipe, one message per step.

In one process the event loop's per-token work (Starlette, SSE writes) holds the GIL the engine
thread needs between ORT runs, so with B rows it adds to every step. Here the child steps the
Engine on its only thread and, after each step, sends one StepReport with every request's new
tokens and the requests that ended; the parent reads it on its event loop (one wake-up per step
for all streams) and feeds the RequestHandles its callers consume. A request is checked by the
same Admission as in process (RequestError / QueueFull / EngineClosed at once) before it crosses;
a cancel (a client gone) crosses and frees the row at the child's next step. The child ignores
SIGINT and SIGTERM (the parent drains it: `close(grace)`) and ends when the pipe closes. Every message is a
frozen dataclass sent as tagged JSON, never pickle; no torch on either side for ORT.

    python3 -m mixtral_export.runtimes.engine_process FD SPEC   # started by ProcessClient, not by hand
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
from dataclasses import asdict, dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path

from mixtral_export.errors import UserError
from mixtral_export.runtimes.constraint import Grammars
from mixtral_export.runtimes.engine import Engine
from mixtral_export.runtimes.engine_client import RequestHandle, wake_consumers
from mixtral_export.runtimes.load import load_step_manifest, open_step_backend, open_tokenizer
from mixtral_export.runtimes.logprobs import TokenLogprob
from mixtral_export.runtimes.requests import (Admission, Completion, EngineClosed, GenerationConfig, QueueFull,
                                              TokenEvent)
from mixtral_export.runtimes.step import RequestError

START_SECONDS = 600  # a large artifact on a busy machine takes minutes to open


class EngineStartError(UserError, RuntimeError):
    """The engine process could not open the artifact (its own one-line reason)."""


# ---- the messages: parent -> child (Submit, Cancel, Close), child -> parent (Ready, Failed, StepReport) ----

@dataclass(frozen=True)
class Submit:
    id: int
    prompt: list[int]
    config: GenerationConfig
    timeout: float | None

    def to_json(self) -> dict:
        return {**asdict(self), "config": self.config.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> "Submit":
        return cls(data["id"], data["prompt"], GenerationConfig.from_json(data["config"]), data["timeout"])


@dataclass(frozen=True)
class Cancel:
    id: int


@dataclass(frozen=True)
class Close:
    grace: float


@dataclass(frozen=True)
class Ready:
    pid: int


@dataclass(frozen=True)
class Failed:
    reason: str


@dataclass(frozen=True)
class Ended:
    """A request's end: its completion's fields, or the error of the step that ended it."""

    id: int
    token_ids: list[int]
    text: str | None
    finish_reason: str
    error: str | None = None
    logprobs: list | None = None  # TokenLogprob.to_json() per token, when asked


@dataclass(frozen=True)
class StepReport:
    """What one step changed: new tokens (id, token, text delta, TokenLogprob.to_json() or None) in order,
    ended requests, the engine's state."""

    busy_rows: int
    queue_depth: int
    tokens: list[tuple[int, int, str, list | None]]
    ended: list[Ended]
    cache_span: int = 0  # the cache slots the last step attended over

    @classmethod
    def from_json(cls, data: dict) -> "StepReport":
        return cls(data["busy_rows"], data["queue_depth"], [tuple(t) for t in data["tokens"]],
                   [Ended(**e) for e in data["ended"]], data.get("cache_span", 0))


MESSAGES = {cls.__name__: cls for cls in (Submit, Cancel, Close, Ready, Failed, StepReport)}


def encode(message) -> bytes:
    body = message.to_json() if hasattr(message, "to_json") else asdict(message)
    return json.dumps({"type": type(message).__name__, **body}).encode()


def decode(data: bytes):
    fields = json.loads(data)
    cls = MESSAGES[fields.pop("type")]
    return cls.from_json(fields) if hasattr(cls, "from_json") else cls(**fields)


@dataclass(frozen=True)
class ChildSpec:
    """How the child opens its engine (its command line's JSON)."""

    artifact: str
    runtime: str
    provider: str
    threads: int | None
    checkpoint: str | None
    max_rows: int | None
    stage_actors: bool = False  # a staged artifact's stages as Ray actors (runtimes/ray_stages.py)
    row_groups: int = 1  # a staged artifact's rows in groups in flight (runtimes/pipeline.py)
    stage_options: list | dict | None = None  # with stage_actors: each actor's Ray options


# ---- the parent ----

@dataclass(frozen=True)
class Supervision:
    """How a dead engine process is replaced: the pauses before the tries of one crash loop (a process
    that dies within `stable_seconds` of its start continues the loop), after which the client gives up."""

    delays: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0)
    stable_seconds: float = 30.0


class ProcessClient:
    """An EngineClient (runtimes/engine_client.py) whose engine steps in a child process. Submit from
    the event loop that consumes the handles; `manifest` and `tokenizer` are the artifact's.

    The child is supervised: when it dies, its requests end with an error and a new one is started
    (`state` "restarting", then "ok"; `restarts` counts them); a crash loop backs off by `supervision`
    and then gives up (`state` "failed", one line on stderr)."""

    def __init__(self, artifact: str | Path, runtime: str = "ort", provider: str = "cpu", threads: int | None = None,
                 checkpoint: str | Path | None = None, max_queue: int | None = None, max_rows: int | None = None,
                 supervision: Supervision = Supervision(), stage_actors: bool = False, row_groups: int = 1,
                 stage_options: list | dict | None = None):
        """`stage_actors`, `row_groups`, `stage_options`: a staged artifact's pipeline (runtimes/pipeline.py)."""
        manifest = load_step_manifest(artifact)
        self.manifest = manifest
        self.tokenizer = open_tokenizer(manifest)
        grammars = None if self.tokenizer is None else Grammars(self.tokenizer, manifest.shapes.vocab_size)
        shapes = replace(manifest.shapes, batch=row_groups * manifest.shapes.batch)  # the child engine's rows
        self.admission = Admission.of(shapes, manifest.config.max_position_embeddings, max_rows, max_queue, grammars)
        self.supervision = supervision
        self.closed = False
        self.state = "ok"  # "ok" | "restarting" | "failed" (given up); `closed` once close() is called
        self.restarts = 0
        self.busy_rows = self.queue_depth = 0  # as of the child's last step
        self.cache_span = 0  # the cache slots the child's last step attended over (0: none yet)
        self.handles: dict[int, RequestHandle] = {}  # submitted, not yet ended
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._spec = ChildSpec(str(artifact), runtime, provider, threads,
                               None if checkpoint is None else str(checkpoint), max_rows, stage_actors, row_groups,
                               stage_options)
        self._crashes = 0  # engine processes in a row that died before `stable_seconds`
        self.process, self.conn, self.engine_pid = start_child(self._spec)
        self._started_at = time.monotonic()

    def submit(self, prompt_ids: list[int], config: GenerationConfig, index: int = 0,
               timeout: float | None = None) -> RequestHandle:
        """Check and queue one prompt; consume the handle on this event loop."""
        waiting = max(0, len(self.handles) - self.admission.max_rows)  # in flight beyond the rows: queued
        ids = self.admission.check(prompt_ids, config, self.tokenizer is not None, timeout, self.closed, waiting)
        self.admission.constrain(ids, config)  # a bad grammar is refused here, before it crosses
        if self.state != "ok":
            raise EngineClosed("the engine process is restarting" if self.state == "restarting" else
                               "the engine process failed and was not restarted")
        self._listen()
        rid = next(self._ids)
        handle = self.handles[rid] = RequestHandle(index, ids, lambda: self._cancel(rid))
        try:
            self._send(Submit(rid, ids, config, timeout))
        except OSError:  # it died since its last report: the reader restarts it
            del self.handles[rid]
            raise EngineClosed("the engine process exited") from None
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        handle.cancel()

    def _cancel(self, rid: int) -> None:
        if rid in self.handles:
            try:
                self._send(Cancel(rid))
            except OSError:  # the engine process is gone: its loss ends the request
                pass

    def _send(self, message) -> None:
        with self._send_lock:
            self.conn.send_bytes(encode(message))

    def _listen(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self.conn.fileno(), self._receive)

    def _receive(self) -> None:
        """Every report that has arrived (usually one step's), then one wake-up for the touched handles."""
        touched: dict[int, RequestHandle] = {}
        try:
            while self.conn.poll():
                self._apply(decode(self.conn.recv_bytes()), touched)
        except (EOFError, OSError):  # the engine process is gone
            self._lost(touched)
        wake_consumers(list(touched.values()))

    def _apply(self, report: StepReport, touched: dict[int, RequestHandle]) -> None:
        self.busy_rows, self.queue_depth, self.cache_span = report.busy_rows, report.queue_depth, report.cache_span
        for rid, token, text, logprob in report.tokens:
            handle = touched[rid] = self.handles[rid]
            handle.push(TokenEvent(handle.index, token, text, None if logprob is None else TokenLogprob.from_json(logprob)))
        for end in report.ended:
            handle = touched[end.id] = self.handles.pop(end.id)
            logprobs = None if end.logprobs is None else [TokenLogprob.from_json(entry) for entry in end.logprobs]
            completion = None if end.error else Completion(handle.prompt_ids, end.token_ids, end.text,
                                                           end.finish_reason, logprobs)
            handle.finish(completion, RuntimeError(end.error) if end.error else None)

    def _lost(self, touched: dict[int, RequestHandle]) -> None:
        """The engine process ended: its requests end with an error; unless closing, start another."""
        self._loop.remove_reader(self.conn.fileno())
        self.conn.close()
        for rid, handle in self.handles.items():
            handle.finish(None, RuntimeError("the engine process exited"))
            touched[rid] = handle
        self.handles.clear()
        self.busy_rows = self.queue_depth = 0
        if not self.closed:
            self.state = "restarting"
            threading.Thread(target=self._restart, name="engine-restart", daemon=True).start()

    def _restart(self) -> None:
        """On a thread of its own (starting a child blocks): back off, start, hand it to the loop."""
        code = self.process.wait()
        quick = time.monotonic() - self._started_at < self.supervision.stable_seconds
        self._crashes = self._crashes + 1 if quick else 1
        reason = f"exit code {code}"
        while self._crashes <= len(self.supervision.delays):
            time.sleep(self.supervision.delays[self._crashes - 1])
            if self.closed:
                return
            try:
                started = start_child(self._spec)
            except EngineStartError as error:
                self._crashes, reason = self._crashes + 1, str(error)
                continue
            try:
                self._loop.call_soon_threadsafe(self._attach, *started)
            except RuntimeError:  # the loop is closed: the server is gone, and so is this engine
                started[0].kill()
                started[0].wait()
            return
        self.state = "failed"
        print(f"the engine process is not restarted again: {len(self.supervision.delays)} tries in a row failed "
              f"(last: {reason}); /health stays 503", file=sys.stderr, flush=True)

    def _attach(self, process: subprocess.Popen, conn: Connection, pid: int) -> None:
        """On the loop: the new engine process serves from now on (or, when closing, is let go)."""
        self.process, self.conn, self.engine_pid = process, conn, pid
        self._started_at = time.monotonic()
        self._loop.add_reader(conn.fileno(), self._receive)
        if self.closed:  # close() came during the start: this one ends at once
            self.close()
            return
        self.restarts += 1
        self.state = "ok"

    def close(self, grace: float = 0.0) -> None:
        """Stop admitting; the child lets running requests finish for `grace` s, cancels the rest, exits."""
        self.closed = True
        try:
            self._send(Close(grace))
        except OSError:
            pass
        try:
            self.process.wait(grace + 30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_child(spec: ChildSpec) -> tuple[subprocess.Popen, Connection, int]:
    """Start an engine process and wait until its engine is open: (the process, its pipe, its pid)."""
    ours, theirs = socket.socketpair()
    process = subprocess.Popen([sys.executable, "-m", "mixtral_export.runtimes.engine_process",
                                str(theirs.fileno()), json.dumps(asdict(spec))],
                               pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
    theirs.close()
    conn = Connection(ours.detach())
    deadline = time.monotonic() + START_SECONDS
    while not conn.poll(0.2):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            conn.close()
            raise EngineStartError(f"the engine process exited (code {process.wait()}) before it was ready")
    message = decode(conn.recv_bytes())
    if isinstance(message, Failed):
        process.wait(30)
        conn.close()
        raise EngineStartError(message.reason)
    return process, conn, message.pid


# ---- the child ----

def serve_pipe(conn: Connection, engine: Engine, tokenizer) -> None:
    """Step the engine on this thread; between steps take the parent's messages (blocking when idle),
    after each step send what changed in one StepReport. Returns once closed and drained."""
    handles: dict[int, RequestHandle] = {}
    ended: list[Ended] = []
    reported, closing_at = None, None
    while True:
        wait = 0 if engine.waiting or engine.busy_rows or closing_at is not None else None
        while conn.poll(wait):
            wait = 0
            message = decode(conn.recv_bytes())  # EOFError: the parent is gone
            if isinstance(message, Submit):
                try:
                    detokenizer = tokenizer.stream_decoder() if tokenizer is not None else None
                    handles[message.id] = engine.submit(message.prompt, message.config, detokenizer,
                                                        timeout=message.timeout)
                except (RequestError, EngineClosed, QueueFull) as error:  # a submit racing the close
                    ended.append(Ended(message.id, [], None, "cancelled", str(error)))
            elif isinstance(message, Cancel):
                if (handle := handles.get(message.id)) is not None:
                    handle.cancel()
            elif isinstance(message, Close):
                engine.stop_admitting()
                closing_at = time.monotonic() + message.grace
        drained = not (engine.waiting or engine.busy_rows)
        if closing_at is not None and (drained or time.monotonic() >= closing_at):
            engine.stop()  # cancels what is left; the step below retires it
        engine.step()
        tokens = []
        for rid, handle in list(handles.items()):
            try:
                got, done = handle.poll()
                error = None
            except Exception as failure:  # the step that ended it failed
                got, done, error = [], True, f"{type(failure).__name__}: {failure}"
            tokens += [(rid, event.token_id, event.text_delta, None if event.logprob is None else event.logprob.to_json())
                       for event in got]
            if done:
                del handles[rid]
                completion = handle.completion
                ended.append(Ended(rid, [], None, "cancelled", error) if error else
                             Ended(rid, completion.token_ids, completion.text, completion.finish_reason,
                                   logprobs=None if completion.logprobs is None else
                                   [entry.to_json() for entry in completion.logprobs]))
        state = (engine.busy_rows, engine.queue_depth, engine.cache_span)
        if tokens or ended or state != reported:
            conn.send_bytes(encode(StepReport(*state[:2], tokens, ended, state[2])))
            ended, reported = [], state
        if closing_at is not None and not handles and not (engine.waiting or engine.busy_rows):
            return


def main() -> None:
    fd, spec = int(sys.argv[1]), ChildSpec(**json.loads(sys.argv[2]))
    for sig in (signal.SIGINT, signal.SIGTERM):  # a signal to the whole group: the parent drains us
        signal.signal(sig, signal.SIG_IGN)
    conn = Connection(fd)
    try:
        backend, manifest = open_step_backend(spec.artifact, spec.runtime, provider=spec.provider,
                                              threads=spec.threads, checkpoint=spec.checkpoint, ray=spec.stage_actors,
                                              stage_options=spec.stage_options, row_groups=spec.row_groups)
        tokenizer = open_tokenizer(manifest)
        engine = Engine(backend, max_rows=spec.max_rows, max_positions=manifest.config.max_position_embeddings,
                        tokenizer=tokenizer)
    except Exception as error:  # UserError and whatever opening a backend raises: one line to the parent
        conn.send_bytes(encode(Failed(str(error) or type(error).__name__)))
        sys.exit(2)
    conn.send_bytes(encode(Ready(os.getpid())))
    try:
        serve_pipe(conn, engine, tokenizer)
    except (EOFError, OSError):  # the parent went away: nobody to answer
        engine.stop()
        engine.step()


if __name__ == "__main__":
    main()
