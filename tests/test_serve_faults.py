"""The server under faults, as a real process on 127.0.0.1: a drained shutdown, an API key, limits,
a killed engine process, a client that stops reading."""
from __future__ import annotations

import http.client
import json
import signal
import threading
import time

import pytest

pytest.importorskip("openai")
pytest.importorskip("fastapi")

from tests.test_serve import Server, children, get  # noqa: E402


def post(server: Server, path: str, body: bytes, headers: dict | None = None, timeout: float = 30) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        connection.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
        reply = connection.getresponse()
        return reply.status, reply.read().decode()
    finally:
        connection.close()


def read_stream(server: Server, body: dict, on_first=None, headers: dict | None = None) -> dict:
    """One streamed completion over raw HTTP: its status, finish reason, whether [DONE] came, any in-band error."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/completions", json.dumps({"model": "tiny", "stream": True, **body}),
                       {"Content-Type": "application/json", **(headers or {})})
    reply = connection.getresponse()
    got = {"status": reply.status, "finish": None, "done": False, "error": None, "tokens": 0}
    for line in reply:
        data = line.decode().strip().removeprefix("data:").strip()
        if not line.startswith(b"data:"):
            continue
        if data == "[DONE]":
            got["done"] = True
            continue
        part = json.loads(data)
        if "error" in part:
            got["error"] = part["error"]["message"]
            continue
        if got["tokens"] == 0 and on_first is not None:
            on_first()
        got["tokens"] += 1
        got["finish"] = part["choices"][0]["finish_reason"] or got["finish"]
    connection.close()
    return got


def run_streams(server: Server, bodies: list[dict], started: int) -> tuple[list[threading.Thread], dict, threading.Barrier]:
    """Start one thread per streamed body; the barrier releases once `started` of them have a first token."""
    results: dict[int, dict] = {}
    first = threading.Barrier(started + 1, timeout=60)

    def work(n):
        try:
            results[n] = read_stream(server, bodies[n], on_first=lambda: first.wait() if n < started else None)
        except Exception as error:  # recorded, asserted below
            results[n] = {"exception": repr(error)}

    threads = [threading.Thread(target=work, args=(n,)) for n in range(len(bodies))]
    for thread in threads:
        thread.start()
    return threads, results, first


@pytest.mark.parametrize("mode", [(), ("--in-process",)], ids=["engine-process", "in-process"])
def test_sigterm_drains_running_and_queued_streams_and_refuses_new_requests_with_503(tiny_onnx, mode):
    """Batch 2, four streams (two queued): each ends with a finish_reason and [DONE]; a request during the
    drain gets 503 (the port is still open); exit 0."""
    server = Server(tiny_onnx, "--grace", "2", *mode)
    bodies = [dict(prompt=f"request {n}", max_tokens=1000 if n % 2 else 12, temperature=0) for n in range(4)]
    threads, results, first = run_streams(server, bodies, started=2)
    first.wait()
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    late = post(server, "/v1/completions", json.dumps({"model": "tiny", "prompt": "late", "max_tokens": 2}).encode())
    for thread in threads:
        thread.join(60)
    code, output = server.stop()
    assert code == 0, output
    assert late[0] == 503, late
    for n in range(4):
        assert results[n].get("status") == 200 and results[n]["done"] and results[n]["error"] is None, results
        assert results[n]["finish"] in ("length", "stop"), results  # the cut ones end as "length"
