"""Every error the API answers, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Routes raise `ApiError`; `install_error_handlers` renders it, FastAPI's request-validation errors (a field out of
range, a body that is not JSON: both 400 `invalid_request_error`), Starlette's HTTP errors (unknown route, wrong
method: 405 with an `Allow` header naming every method the path has) and anything unexpected (500) in that one shape.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_exceeded"
SERVER_ERROR = "server_error"


class ApiError(Exception):
    """An error answered to the client: HTTP status plus OpenAI's `type`, `code` and `param`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,  # OpenAI's field name
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, code=self.code, param=self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, *, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": _encodable(message), "type": type, "param": param, "code": code}}


_SURROGATE = re.compile("[\ud800-\udfff]")


def _encodable(message: str) -> str:
    """A message that echoes a client's string may hold a lone surrogate (JSON lets a client send "\\ud800"), which
    UTF-8 cannot encode: the response would fail to render. Such a character is written as its escape, in text."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", message)


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, type=INVALID_REQUEST, code=code, param=param)


def check_text(text: str, *, param: str) -> None:
    """Refuse text that UTF-8 cannot encode: a lone surrogate, which JSON can escape (`"\\ud800"`) but no tokenizer
    can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(
            f"The {param} holds a lone surrogate (U+{ord(text[exc.start]):04X} at character {exc.start}), which is not "
            "valid Unicode text.",
            param=param,
        ) from exc


def internal_error(message: str) -> ApiError:
    return ApiError(500, message, type=SERVER_ERROR, code="internal_error")


def _validation_error(exc: RequestValidationError) -> ApiError:
    errors: Sequence[Mapping[str, Any]] = exc.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        detail = next(err for err in errors if err.get("type") == "json_invalid")
        reason = detail.get("ctx", {}).get("error")
        suffix = f": {reason}" if reason else ""
        return bad_request(f"We could not parse the JSON body of your request{suffix}. The body must be a JSON object.")
    messages = []
    param = None
    for err in errors:
        loc = [str(part) for part in err.get("loc", ()) if part != "body"]
        field = ".".join(loc)
        if param is None and loc:
            param = loc[0]
        messages.append(f"{field}: {err.get('msg', 'invalid value')}" if field else str(err.get("msg")))
    return bad_request("Invalid request: " + "; ".join(messages), param=param)


_HTTP_TYPES = {404: NOT_FOUND, 429: RATE_LIMIT}


def _allowed_methods(request: Request) -> str:
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):  # included routers' routes too
        if route.methods and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _validation_error(exc).response()

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        error_type = _HTTP_TYPES.get(status, INVALID_REQUEST if status < 500 else SERVER_ERROR)
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        headers = dict(exc.headers or {})
        if status == 405:  # Starlette names only the methods of the first route on the path
            headers["Allow"] = _allowed_methods(request)
        return ApiError(status, message, type=error_type, headers=headers).response()

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error while serving a request", exc_info=exc)
        return ApiError(500, f"Internal server error: {type(exc).__name__}", type=SERVER_ERROR).response()

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
