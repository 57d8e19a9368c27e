"""JSON request bodies, kept off the event loop: read within `--max-request-bytes`, then parsed and validated away
from it (`RequestWorker`), where the routes also render and tokenize prompts.

The limit is enforced twice, as for adapter uploads (`upload_body`, which has its own limit, `--max-adapter-bytes`):
a `Content-Length` above it is refused before reading, and a body that grows past it (chunked, or lying about its
length) is refused at that point, without reading further. Both answer 413 `request_too_large`.

Where a body is parsed depends on its size: up to `SMALL_BODY_BYTES` (nearly every request) in a thread; bigger in
a child process (`parse_process`), since parsing holds the GIL throughout and a stream of big bodies stalled every
tenant's tokens.

`JsonBodyRoute` is the route class (FastAPI's custom-`APIRoute` extension point) of every route with a JSON body:
it reads the body, has it parsed and validated, and hands FastAPI the validated model, which FastAPI takes as it is
(pydantic does not validate a model instance again). Errors read as FastAPI's own: invalid JSON and invalid fields
raise `RequestValidationError`, which `errors` renders as 400. Routes without a JSON body (the multipart upload,
GETs) pass through untouched.
"""

from __future__ import annotations

import asyncio
import email.message
import functools
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.params import Form
from fastapi.routing import APIRoute

from switchboard.serving.api.errors import ApiError
from switchboard.serving.api.parse_process import ParseProcess, parse_body
from switchboard.serving.engine import openmp

T = TypeVar("T")

# Bodies up to this size are parsed in a thread (a few milliseconds at most), and their prompts templated and
# tokenized in the small lane; bigger ones are parsed in the parse process and their prompts handled in the large
# lane, so that a request of megabytes (seconds to tokenize) never holds up the others.
SMALL_BODY_BYTES = 64 * 1024


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"The request body is larger than this server's limit of {limit} bytes (--max-request-bytes).",
        code="request_too_large",
    )


async def read_limited(request: Request, limit: int) -> bytes:
    """The whole body of `request`; 413 as soon as it is known to exceed `limit` bytes."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


class RequestWorker:
    """Where request work that costs CPU runs: body parsing and validation, chat templates, tokenization.

    Two threads, one for requests whose body is up to `SMALL_BODY_BYTES` and one for bigger ones (no more: each
    competes with the engine's step thread for the GIL and the cores); bigger bodies are parsed in the parse process.
    """

    def __init__(self) -> None:
        self._small = openmp.serial_pool("switchboard-request")
        self._large = openmp.serial_pool("switchboard-large-request")
        self._parser = ParseProcess()

    async def run(self, body_bytes: int, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the lane of a request whose body has `body_bytes` bytes."""
        pool = self._small if body_bytes <= SMALL_BODY_BYTES else self._large
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    async def parse(self, raw: bytes, model: type) -> Any:
        """`raw` parsed and validated as `model`; `RequestValidationError` as FastAPI raises it when invalid."""
        parse = parse_body if len(raw) <= SMALL_BODY_BYTES else self._parser.parse
        return await self.run(len(raw), parse, raw, model)

    def shutdown(self) -> None:
        for pool in (self._small, self._large):
            pool.shutdown(wait=False, cancel_futures=True)
        self._parser.close()


class _ReadRequest(Request):
    """A request whose body is already read (and, for JSON, parsed and validated): FastAPI reads it from here."""

    def __init__(self, request: Request, raw: bytes, parsed: Any = None) -> None:
        super().__init__(request.scope, request.receive)
        self._raw = raw
        self._parsed = parsed

    async def body(self) -> bytes:
        return self._raw

    async def json(self) -> Any:
        return self._parsed


def json_body_route(limit: int, worker: RequestWorker) -> type[APIRoute]:
    """The route class for an app or router whose JSON bodies are limited to `limit` bytes and parsed in `worker`."""

    class JsonBodyRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()
            field = self.body_field
            if field is None or isinstance(field.field_info, Form):
                return handler
            model = field.field_info.annotation  # the route's body model: `body: CompletionRequest`

            async def read_then_handle(request: Request) -> Response:
                raw = await read_limited(request, limit)
                if not raw or not _is_json(request.headers.get("content-type")):
                    # No body, or not JSON: FastAPI refuses it as before (a missing field; not an object), cheaply.
                    return await handler(_ReadRequest(request, raw))
                parsed = await worker.parse(raw, model)
                return await handler(_ReadRequest(request, raw, parsed))

            return read_then_handle

    return JsonBodyRoute


def _is_json(content_type: str | None) -> bool:
    """FastAPI's test: `application/json` or `application/*+json`."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))
