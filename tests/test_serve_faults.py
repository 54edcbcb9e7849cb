"""The server under faults, as a real process on 127.0.0.1: a drained shutdown, an API key, limits,
a killed engine process, a client that stops reading."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
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
    wait_until_accepted(server, len(bodies))  # the queued two too: else a late thread's request meets the drain
    server.process.send_signal(signal.SIGTERM)
    wait_until_closing(server)  # at once, not after a fixed sleep: on a quiet machine the streams can end first
    late = post(server, "/v1/completions", json.dumps({"model": "tiny", "prompt": "late", "max_tokens": 2}).encode())
    for thread in threads:
        thread.join(60)
    code, output = server.stop()
    assert code == 0, output
    assert late[0] == 503, late
    for n in range(4):
        assert results[n].get("status") == 200 and results[n]["done"] and results[n]["error"] is None, results
        assert results[n]["finish"] in ("length", "stop"), results  # the cut ones end as "length"


def wait_until_closing(server: Server, timeout: float = 10) -> None:
    """Until /health says the server is draining (the signal has been handled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = get(server.url + "/health")[1]
        if json.loads(body or "{}").get("status") == "closing":
            return
        time.sleep(0.005)
    raise AssertionError(f"/health did not say closing within {timeout} s of SIGTERM")


def wait_until_accepted(server: Server, count: int, timeout: float = 30) -> None:
    """Until the server holds or has ended `count` requests (busy rows + queue + ended, from /metrics)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = get(server.url + "/metrics")[1]
        held = sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(("mixtral_busy_rows ", "mixtral_queue_depth ", "mixtral_requests_total{")))
        if held >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"the server did not accept {count} requests within {timeout} s")


def request(server: Server, method: str, path: str, key: str | None = None) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request(method, path, json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 2}),
                           {} if key is None else {"Authorization": f"Bearer {key}"})
        reply = connection.getresponse()
        reply.read()
        return reply.status
    finally:
        connection.close()


@pytest.fixture(scope="module")
def keyed_server(tiny_onnx):
    """The key from the environment (as a deployment passes it), a 1 MB body limit."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MIXTRAL_EXPORT_API_KEY", "s3cret")
        running = Server(tiny_onnx, "--max-body-mb", "1")
    yield running
    code, output = running.stop()
    assert code == 0, output


@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", "/v1/completions"),
                                          ("POST", "/v1/chat/completions"), ("GET", "/metrics"),
                                          ("GET", "/no/such/route")])
def test_every_route_but_health_needs_the_api_key(keyed_server, method, path):
    assert request(keyed_server, method, path) == 401
    assert request(keyed_server, method, path, key="s3cre") == 401
    assert request(keyed_server, method, path, key="s3cret") in (200, 400, 404)  # past the key: the route's own answer
    assert request(keyed_server, "GET", "/health") == 200


def test_the_api_key_flag_and_the_openai_client(tiny_onnx):
    import openai

    server = Server(tiny_onnx, "--api-key", "flag-key")
    try:
        assert request(server, "GET", "/v1/models") == 401
        keyed = openai.OpenAI(base_url=server.url + "/v1", api_key="flag-key", max_retries=0, timeout=60)
        assert [m.id for m in keyed.models.list().data] == ["tiny"]
        assert keyed.completions.create(model="tiny", prompt="x", max_tokens=3).usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            server.client.models.list()  # api_key="none"
    finally:
        assert server.stop()[0] == 0


def test_a_body_over_the_limit_gets_413_at_once_and_the_server_stays_healthy(keyed_server):
    key = {"Authorization": "Bearer s3cret"}
    started = time.monotonic()
    big = json.dumps({"model": "tiny", "prompt": "x" * (20 * 2**20), "max_tokens": 2}).encode()  # 20 MB
    status, body = post(keyed_server, "/v1/completions", big, key)
    assert status == 413 and json.loads(body)["error"]["message"], body
    assert time.monotonic() - started < 10
    connection = http.client.HTTPConnection("127.0.0.1", keyed_server.port, timeout=30)  # no Content-Length
    connection.putrequest("POST", "/v1/completions")
    for name, value in {**key, "Transfer-Encoding": "chunked", "Content-Type": "application/json"}.items():
        connection.putheader(name, value)
    connection.endheaders()
    piece = b"x" * 2**16
    for _ in range(24):  # 1.5 MB in chunks
        connection.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    connection.send(b"0\r\n\r\n")
    assert connection.getresponse().status == 413
    connection.close()
    assert get(keyed_server.url + "/health")[0] == 200
    assert post(keyed_server, "/v1/completions", json.dumps({"model": "tiny", "prompt": "y", "max_tokens": 2}).encode(),
                key)[0] == 200


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (value := condition()):
            return value
        time.sleep(0.1)
    pytest.fail(f"{what} not within {seconds} s")


def test_a_killed_engine_process_ends_its_streams_with_an_error_and_is_restarted(tiny_onnx):
    """SIGKILL under 4 streams (batch 2: two queued): every stream ends within 20 s with an in-band error,
    the same server answers again within 30 s, and /metrics counts the restart."""
    server = Server(tiny_onnx)
    try:
        (engine,) = children(server.process.pid)
        bodies = [dict(prompt=f"request {n}", max_tokens=1000, temperature=0) for n in range(4)]
        threads, results, first = run_streams(server, bodies, started=2)
        first.wait()
        killed = time.monotonic()
        os.kill(engine, signal.SIGKILL)
        for thread in threads:
            thread.join(20)
        assert time.monotonic() - killed < 20 and not any(t.is_alive() for t in threads)
        errors = [n for n in range(4) if "the engine process exited" in (results[n].get("error") or "")]
        for n in range(4):  # an in-band error then [DONE]; one may have met EOS first; a late one 503
            got = results[n]
            assert (got.get("status") == 200 and got["done"] and (n in errors or got["finish"] in ("length", "stop"))
                    or got.get("status") == 503), results
        assert errors, results
        wait_for(lambda: get(server.url + "/health")[0] == 200, 30, "/health 200 after the restart")
        assert time.monotonic() - killed < 30
        reply = server.client.completions.create(model="tiny", prompt="again", max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens == 3
        (restarted,) = children(server.process.pid)
        assert restarted != engine and server.metric("mixtral_engine_restarts") == 1
        assert server.metric("mixtral_engine_up") == 1
    finally:
        code, output = server.stop()
    assert code == 0, output


def test_a_crash_loop_backs_off_then_gives_up_with_one_line(tiny_onnx, tmp_path, capfd):
    """An engine process that cannot start again (its artifact gone): the client tries each back-off
    delay, then stays "failed" and says so once; submits are refused meanwhile."""
    import asyncio
    import shutil

    from mixtral_export.runtimes.engine_process import ProcessClient, Supervision
    from mixtral_export.runtimes.requests import EngineClosed, generation_config

    artifact = shutil.copytree(tiny_onnx, tmp_path / "artifact")
    client = ProcessClient(artifact, threads=1, supervision=Supervision(delays=(0.0, 0.1, 0.2), stable_seconds=60))

    async def crash():
        handle = client.submit([1, 2, 3], generation_config((), max_new_tokens=1000))
        async for _ in handle.batches():
            break
        (artifact / "model.onnx").unlink()  # a new engine process fails to open it
        os.kill(client.engine_pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="the engine process exited"):
            async for _ in handle.batches():
                pass
        assert client.state == "restarting"
        with pytest.raises(EngineClosed, match="restarting"):
            client.submit([1, 2], generation_config((), max_new_tokens=2))
        while client.state == "restarting":
            await asyncio.sleep(0.1)

    try:
        asyncio.run(asyncio.wait_for(crash(), 120))
        assert client.state == "failed" and client.restarts == 0
        lines = [line for line in capfd.readouterr().err.splitlines() if "not restarted again" in line]
        assert len(lines) == 1 and "3 tries in a row failed" in lines[0], lines
    finally:
        client.close()


def test_a_stream_whose_client_stops_reading_is_cut_after_the_stall_time_and_its_request_cancelled():
    """A send that never completes (a full socket buffer): after stall_seconds the response ends, the
    generator's `finally` runs (where the app cancels the request) and the stall is counted."""
    import asyncio

    from mixtral_export.serving.bounded_stream import BoundedStream

    events = []

    async def chunks():
        try:
            for n in range(1000):
                yield f"data: {n}\n\n"
        finally:
            events.append("cancelled")

    async def send(message):
        if message["type"] == "http.response.body" and message["body"] != b"data: 0\n\n":
            await asyncio.Event().wait()  # the client stopped reading after the first chunk

    response = BoundedStream(chunks(), 0.2, lambda: events.append("stalled"), media_type="text/event-stream")
    started = time.monotonic()
    asyncio.run(asyncio.wait_for(response.stream_response(send), 10))
    assert events == ["stalled", "cancelled"] and 0.2 <= time.monotonic() - started < 5


def test_a_client_that_stops_reading_does_not_slow_the_others(tiny_onnx):
    """One stream whose client never reads (a tiny receive buffer) beside four requests: they take at
    most 3x what they take alone (plus a second of slack for a busy machine)."""
    server = Server(tiny_onnx, "--stall-timeout", "2")
    try:
        body = dict(prompt="Beautiful is better than", max_tokens=24, temperature=0)

        def four() -> float:
            started = time.monotonic()
            threads, results, first = run_streams(server, [body] * 4, started=0)
            for thread in threads:
                thread.join(60)
            assert all(r.get("done") for r in results.values()), results
            return time.monotonic() - started

        alone = four()
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        stalled.connect(("127.0.0.1", server.port))
        request = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 1000, "stream": True})
        stalled.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(request)}\r\n\r\n{request}".encode())
        beside = four()
        assert beside < 3 * alone + 1.0, (alone, beside)
        stalled.close()
    finally:
        code, output = server.stop()
    assert code == 0, output


@pytest.mark.parametrize("flags, message", [(("--port", "PORT"), "is already in use"),
                                            (("--host", "192.0.2.1", "--port", "0"), "cannot listen on"),  # TEST-NET-1: not this machine
                                            (("--host", "no.such.host.invalid"), "--host no.such.host.invalid")])
def test_a_start_up_error_is_one_line_and_exit_2_with_nothing_printed_before(tiny_onnx, flags, message):
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        run = subprocess.run([sys.executable, "-m", "mixtral_export", "serve", str(tiny_onnx),
                              *[port if f == "PORT" else f for f in flags]], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stdout == "", (run.returncode, run.stdout, run.stderr)
    assert len(run.stderr.splitlines()) == 1 and message in run.stderr, run.stderr


def rss_kb(pid: int) -> int:
    return int(next(line.split()[1] for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS")))


SOAK_KINDS = ("plain", "streamed", "cancelled", "disconnecting", "bad", "oversized")


def soak_one(server: Server, kind: str, n: int) -> bool:
    """One request of `kind` on a connection of its own; whether it ended as that kind must."""
    body = {"model": "tiny", "prompt": f"soak {n}", "max_tokens": 4 + n % 8, "temperature": 0}
    if kind == "plain":
        status, text = post(server, "/v1/completions", json.dumps(body).encode())
        return status == 200 and json.loads(text)["choices"][0]["finish_reason"] in ("length", "stop")
    if kind == "streamed":
        got = read_stream(server, body)
        return got["status"] == 200 and got["done"] and got["finish"] in ("length", "stop")
    if kind == "bad":
        return post(server, "/v1/completions", json.dumps({**body, "temperature": 3}).encode())[0] == 400
    if kind == "oversized":
        return post(server, "/v1/completions", json.dumps({**body, "prompt": "x" * 2**20}).encode())[0] == 413
    connection = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    data = json.dumps({**body, "max_tokens": 200, "stream": kind == "cancelled"})
    connection.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(data)}\r\n\r\n{data}".encode())
    if kind == "cancelled":
        connection.recv(1)  # the stream began
    connection.close()
    return True


@pytest.mark.slow
def test_soak_mixed_requests_end_properly_with_flat_memory_and_exact_metrics(tiny_onnx):
    """~2,000 requests over 16 connections, every kind in SOAK_KINDS: every one ends as it should,
    the server's and engine's RSS grow < 10% after warm-up, the rows empty, the metrics count them all."""
    from concurrent.futures import ThreadPoolExecutor

    server = Server(tiny_onnx, "--max-body-mb", "0.5", "--max-queue", "64")
    try:
        (engine,) = children(server.process.pid)
        rounds, per_round = 10, 192
        sent = {kind: 0 for kind in SOAK_KINDS}
        failures, rss, started = [], [], time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            for round_ in range(rounds):
                kinds = [SOAK_KINDS[(round_ + n) % len(SOAK_KINDS)] for n in range(per_round)]
                for kind, ok in zip(kinds, pool.map(lambda a: soak_one(server, *a),
                                                    [(k, round_ * per_round + n) for n, k in enumerate(kinds)])):
                    sent[kind] += 1
                    if not ok:
                        failures.append(kind)
                wait_for(lambda: json.loads(get(server.url + "/health")[1])["busy_rows"] == 0, 30, "idle rows")
                rss.append(rss_kb(server.process.pid) + rss_kb(engine))
        seconds = time.monotonic() - started
        assert not failures, failures
        health = json.loads(get(server.url + "/health")[1])
        assert health["busy_rows"] == 0 and health["queue_depth"] == 0
        total = sum(sent.values())
        wait_for(lambda: server.metric("mixtral_requests_total") == total, 10, "every request counted")
        assert server.metric('mixtral_requests_total{outcome="bad_request"}') == sent["bad"]
        assert server.metric('mixtral_requests_total{outcome="too_large"}') == sent["oversized"]
        warm = rss[1]
        assert max(rss[2:]) < 1.10 * warm, rss
        print(f"soak: {total} requests in {seconds:.0f} s, RSS (front + engine) after warm-up {warm // 1024} MB, "
              f"at most {max(rss[2:]) // 1024} MB, at the end {rss[-1] // 1024} MB")
    finally:
        code, output = server.stop()
    assert code == 0, output


def test_hundreds_of_idle_connections_do_not_starve_an_active_one(tiny_onnx):
    server = Server(tiny_onnx)
    idle = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        started = time.monotonic()
        got = read_stream(server, dict(prompt="still served", max_tokens=8, temperature=0))
        assert got["done"] and got["finish"] in ("length", "stop") and time.monotonic() - started < 10
    finally:
        for connection in idle:
            connection.close()
        code, output = server.stop()
    assert code == 0, output
