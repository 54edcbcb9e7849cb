"""Run the OpenAI-compatible app under uvicorn, with a graceful stop on SIGINT / SIGTERM.

On the first signal the engine stops admitting (new requests get 503: the port stays open while
draining), running and queued requests get `grace` seconds to finish, then are cancelled (their
streams end cleanly with the text so far, a finish_reason and [DONE]); once every response has
been written uvicorn stops listening, and the process exits 0. A second SIGINT forces the exit.
"""
from __future__ import annotations

import errno
import signal
import socket
import threading
import time
from pathlib import Path

import uvicorn

from mixtral_export.errors import UserError
from mixtral_export.serving.app import MAX_BODY_BYTES, build_app
from mixtral_export.serving.bounded_stream import STALL_SECONDS


class PortError(UserError, OSError):
    """The address to serve on cannot be listened on; one line."""


FLUSH_SECONDS = 5.0  # after the engine has drained: for the last chunks to reach their clients


class GracefulServer(uvicorn.Server):
    """uvicorn's Server, but a signal drains the engine first and ends in exit 0 (uvicorn re-raises it).

    uvicorn closes its listening socket as soon as `should_exit` is set, so it is set only after the
    drain: until then a new request is answered 503, not refused a connection."""

    def __init__(self, config: uvicorn.Config, client, grace: float, responses):
        super().__init__(config)
        self.client, self.grace, self.responses = client, grace, responses
        self.draining: threading.Thread | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self.draining is not None:  # a second signal
            if sig == signal.SIGINT:
                self.force_exit = self.should_exit = True
            return
        self.draining = threading.Thread(target=self.drain, daemon=True)
        self.draining.start()

    def drain(self) -> None:
        """Close the engine (running requests get `grace` s), wait for the responses to be written, exit."""
        self.client.close(self.grace)
        deadline = time.monotonic() + FLUSH_SECONDS
        while self.responses.open and time.monotonic() < deadline:
            time.sleep(0.02)
        self.should_exit = True


def serve(artifact: str | Path, runtime: str = "ort", provider: str = "cpu", host: str = "127.0.0.1",
          port: int = 8000, max_queue: int = 64, grace: float = 10.0, model_name: str | None = None,
          request_timeout: float | None = None, threads: int | None = None,
          checkpoint: str | Path | None = None, max_rows: int | None = None, log_level: str = "warning",
          stream_interval: int = 1, in_process: bool = False, api_key: str | None = None,
          max_body: int = MAX_BODY_BYTES, stall_seconds: float = STALL_SECONDS, stage_actors: bool = False,
          row_groups: int = 1, stage_options: list | dict | None = None) -> None:
    """Open the artifact, serve until a signal, close the engine. The engine steps in a process of its
    own (a ProcessClient, runtimes/engine_process.py), or with `in_process` on a thread of this one (a
    Session's InprocessClient)."""
    check_port(host, port)
    if in_process:
        from mixtral_export.runtimes.session import Session

        session = Session.open(artifact, runtime=runtime, provider=provider, threads=threads, checkpoint=checkpoint,
                               max_queue=max_queue, max_rows=max_rows, ray=stage_actors, row_groups=row_groups,
                               stage_options=stage_options)
        client, manifest, tokenizer = session.client, session.manifest, session.tokenizer
    else:
        from mixtral_export.runtimes.engine_process import ProcessClient

        client = ProcessClient(artifact, runtime=runtime, provider=provider, threads=threads, checkpoint=checkpoint,
                               max_queue=max_queue, max_rows=max_rows, stage_actors=stage_actors,
                               row_groups=row_groups, stage_options=stage_options)
        manifest, tokenizer = client.manifest, client.tokenizer
    name = model_name or Path(artifact).resolve().name
    app = build_app(client, tokenizer, manifest.eos_token_id, name, request_timeout=request_timeout,
                    stream_interval=stream_interval, api_key=api_key, max_body=max_body,
                    stall_seconds=stall_seconds)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace + 5,
                            access_log=False, lifespan="off")
    server = GracefulServer(config, client, grace, app.state.responses)
    print(f"serving {name} ({runtime}, {client.admission.max_rows} of {client.admission.batch} rows, "
          f"queue {max_queue}) on http://{host}:{port}/v1", flush=True)
    try:
        server.run()
    finally:
        client.close()


def check_port(host: str, port: int) -> None:
    """Bind host:port once and let it go: a port in use (or a host not of this machine) is one line
    before the artifact is opened or anything printed, not uvicorn's error after loading (exit 3).
    Port 0 (any free port) still checks the host."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise PortError(f"--host {host}: {error.strerror}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise PortError(f"{host}:{port} is already in use; pick another --port") from None
            raise PortError(f"cannot listen on {host}:{port}: {error.strerror} (--host, --port)") from None
