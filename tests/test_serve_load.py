"""The load benchmark's lean HTTP client: where a reply ends, and how its bytes become an Outcome."""
from __future__ import annotations

import asyncio
import json

from mixtral_export.bench.serve_load import Connection, reply


def sse(payload) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"


def chunked(*payloads: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in payloads) + b"0\r\n\r\n"


HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
TEXT = [sse({"choices": [{"text": t}]}) for t in ("Sim", "ple", " is")]
END = sse({"choices": [{"text": "", "finish_reason": "length"}]}) + sse({"choices": [], "usage": {
    "completion_tokens": 3}}) + sse(b"[DONE]")


def test_reply_times_each_text_chunk_by_the_arrival_that_completed_it():
    raw = HEAD + chunked(TEXT[0], TEXT[1], TEXT[2], END)
    first_end = raw.index(TEXT[0]) + len(TEXT[0])  # the bytes up to the end of the first event's chunk
    second_end = raw.index(TEXT[1]) + len(TEXT[1])
    # three reads: the head and half of the first event, then the rest of it and the second, then all else
    arrivals = [(10.0, first_end - 5), (10.5, second_end + 2), (11.25, len(raw))]
    outcome = reply(9.0, raw, arrivals)
    assert outcome.ok and outcome.text == "Simple is" and outcome.tokens == 3
    assert outcome.ttft == 1.5  # the first text arrived with the second read
    assert outcome.gaps == [0.0, 0.75]  # "ple" came in the same read; " is" with the last


def test_reply_failures():
    assert reply(0.0, "ConnectionRefusedError: no", []).error.startswith("ConnectionRefusedError")
    refused = b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 2\r\n\r\n{}"
    assert reply(0.0, refused, [(1.0, len(refused))]).error.startswith("HTTP 429")
    cut = HEAD + chunked(TEXT[0])[:-12]  # the server went away mid-stream
    assert not reply(0.0, cut, [(1.0, len(cut))]).ok
    failed = HEAD + chunked(TEXT[0], sse({"error": {"message": "generation failed"}}))
    assert "generation failed" in reply(0.0, failed, [(1.0, len(failed))]).error


class Transport:
    def __init__(self):
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data


def test_connection_knows_where_a_reply_ends():
    async def exchange(pieces: list[bytes]) -> tuple[bool, int]:
        connection = Connection()
        connection.connection_made(Transport())
        done = connection.send(b"POST / HTTP/1.1\r\n\r\n")
        for n, piece in enumerate(pieces):
            assert not done.done(), f"ended early, before piece {n}"
            connection.data_received(piece)
        return done.done() and done.result(), len(connection.arrivals)

    streamed = HEAD + chunked(*TEXT, END)
    # split inside the head, inside a chunk, and right before the terminal chunk's last bytes
    cuts = [10, len(HEAD) + 7, len(streamed) - 3]
    pieces = [streamed[a:b] for a, b in zip([0, *cuts], [*cuts, len(streamed)])]
    assert asyncio.run(exchange(pieces)) == (True, 4)
    whole = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 11\r\n\r\n{\"error\":1}"
    assert asyncio.run(exchange([whole[:-4], whole[-4:]])) == (True, 2)
