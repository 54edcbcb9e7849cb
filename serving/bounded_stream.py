"""A streamed response that a client who stops reading cannot hold: a write still waiting on a full
socket buffer after `stall_seconds` ends the response, and `on_stall` cancels its request.

The engine never waits for a stream (tokens go into the request's handle whatever the client does);
what a stalled client holds is its batch row and the tokens piling up for it. uvicorn pauses a writer
once the socket's and its own buffer (64 kB) are full, so a stream holds at most those buffers plus
`stall_seconds` of tokens before it is cut (the connection is closed; uvicorn logs one line).
"""
from __future__ import annotations

import asyncio
from typing import Callable

from starlette.responses import StreamingResponse

STALL_SECONDS = 30.0


class BoundedStream(StreamingResponse):
    """Starlette's StreamingResponse with a time limit on each write."""

    def __init__(self, content, stall_seconds: float, on_stall: Callable[[], None], **options):
        super().__init__(content, **options)
        self.stall_seconds, self.on_stall = stall_seconds, on_stall

    async def stream_response(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            body = chunk.encode(self.charset) if isinstance(chunk, str) else chunk
            try:
                await asyncio.wait_for(send({"type": "http.response.body", "body": body, "more_body": True}),
                                       self.stall_seconds)
            except asyncio.TimeoutError:
                self.on_stall()
                await self.body_iterator.aclose()  # the generator's `finally` cancels the request
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})
