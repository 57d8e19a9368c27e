"""Request bodies: a size limit for every request but adapter uploads, and JSON decoded off the event loop.

`BodyLimit` (ASGI middleware) answers 413 in OpenAI's shape when `Content-Length` announces more than
`--max-request-bytes`, and stops reading a body sent without one (chunked) at the limit, so no request makes the
server read, hold or parse more than that. Adapter uploads (`POST /v1/adapters`, multipart) have their own limit,
`--max-adapter-bytes`, which `upload_body` enforces the same way.

`OffLoopJSONRoute` gives FastAPI a request whose `json()` decodes in a worker thread: a body of a few megabytes takes
tens of milliseconds to decode, which every other request on the event loop would otherwise wait for.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError

UPLOAD_PATH = "/v1/adapters"


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"The request body is larger than this server's limit of {limit} bytes (--max-request-bytes).",
        code="request_too_large",
    )


class BodyLimit:
    """Refuse request bodies over `max_bytes` (413), except adapter uploads, which `upload_body` limits."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"] == "POST" and scope["path"].rstrip("/") == UPLOAD_PATH):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _send_error(send, too_large(self.max_bytes))
            return
        # Read the body here, at most the limit, then hand it on whole (the routes read it whole anyway).
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                await _send_error(send, too_large(self.max_bytes))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, handed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal handed
            if not handed:
                handed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when the client goes

        await self.app(scope, replay, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_error(send: Send, error: ApiError) -> None:
    response = error.response()
    response.headers["connection"] = "close"  # the rest of the body is not read
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class OffLoopJSONRequest(Request):
    """A request whose JSON body is decoded in a worker thread."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            self._json = await run_in_threadpool(json.loads, body)
        return self._json


class OffLoopJSONRoute(APIRoute):
    """A route whose handler receives an `OffLoopJSONRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            return await handler(OffLoopJSONRequest(request.scope, request.receive))

        return route_handler
