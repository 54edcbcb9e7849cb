"""The ASGI layers in front of the HTTP app: who may call it (an API key) and which responses are
still open (a drained shutdown waits for them). Plain ASGI, not Starlette's BaseHTTPMiddleware,
so a streamed response passes through untouched.
"""
from __future__ import annotations

import hmac
import json

from mixtral_export.serving.openai_api import error_body

OPEN_ROUTES = ("/health",)  # a load balancer's probe needs no key
API_KEY_VARIABLE = "MIXTRAL_EXPORT_API_KEY"


class OpenResponses:
    """How many HTTP requests the app is still answering (a streamed one until its last chunk)."""

    def __init__(self):
        self.open = 0


class CountResponses:
    """Counts every HTTP request into `responses.open` while the app answers it."""

    def __init__(self, app, responses: OpenResponses):
        self.app, self.responses = app, responses

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.responses.open += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.responses.open -= 1


class RequireApiKey:
    """Every route but OPEN_ROUTES needs `Authorization: Bearer KEY`; 401 with an OpenAI error body
    otherwise. The key is compared in constant time (hmac.compare_digest)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_ROUTES or self.authorized(scope):
            return await self.app(scope, receive, send)
        body = json.dumps(error_body("a valid API key is needed: Authorization: Bearer KEY", "authentication_error",
                                     code="invalid_api_key")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})

    def authorized(self, scope) -> bool:
        given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        return hmac.compare_digest(given, self.expected)
