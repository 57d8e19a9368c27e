"""One buffered HTTP request through an ASGI app in this process, its response as a stream of parts.

The router hands each request to a replica as a picklable `HttpRequest` over a Ray Serve handle; the replica runs it
through its own FastAPI app (the same app `switchboard serve` runs under uvicorn) and streams back a `ResponseStart`
followed by the body's chunks, so server-sent events flow through as the engine produces them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message

Headers = list[tuple[bytes, bytes]]
# How long an app may take to wind down after its caller went away, before its task is cancelled.
DISCONNECT_GRACE_S = 5.0


@dataclass(slots=True)
class HttpRequest:
    method: str
    path: str
    query_string: bytes = b""
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


@dataclass(slots=True)
class ResponseStart:
    status: int
    headers: Headers


async def call_asgi(app: ASGIApp, request: HttpRequest) -> AsyncIterator[ResponseStart | bytes]:
    """Run `request` through `app`: yields one `ResponseStart`, then the body's non-empty chunks.

    Closing the iterator early (the client went away) tells the app `http.disconnect`, as uvicorn would."""
    messages: asyncio.Queue[Message | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await messages.put(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "root_path": "",
        "query_string": request.query_string,
        "headers": request.headers,
        "client": request.client,
        "server": None,
    }
    task = asyncio.create_task(app(scope, receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
        if task.done():
            task.result()  # an exception the app raised instead of answering
    finally:
        disconnected.set()
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), DISCONNECT_GRACE_S)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
