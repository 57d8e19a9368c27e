"""What `/openapi.json` says beyond the routes' signatures: every error status each route group answers, in OpenAI's
error shape, and the bearer key the routes need under `--api-keys`.

Each route group declares its statuses once (`GENERATION_RESPONSES`, `UPLOAD_ERRORS`, ...) and passes them as FastAPI's
`responses=`. `install_openapi` then finishes the document: FastAPI documents request-validation errors as 422
`HTTPValidationError`, while ours are 400 in the error shape (errors.py), so those entries go; and with `--api-keys`
every operation that can answer 401 carries the bearer security requirement.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from switchboard.adapters_store.kinds.base import CONFIG_FILE, WEIGHTS_FILE
from switchboard.adapters_store.store import ADAPTER_ID


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, the body of every 4xx and 5xx."""

    error: ErrorDetail


_WHEN = {
    400: "Invalid request: a body that is not JSON, a field out of range or not supported, a prompt past the context "
    "window, a malformed form.",
    401: "Missing or invalid API key (only with --api-keys): send `Authorization: Bearer KEY`.",
    403: "The key may not do this: an admin-only action, or another tenant's shared adapter.",
    404: "Unknown model or adapter (another tenant's adapter answers the same).",
    409: "The adapter id is taken (`overwrite=true` makes a new version) or the tenant's adapter limit is reached.",
    413: "The request body is larger than this server's limit.",
    422: "The adapter is malformed or does not fit the base model (the message says why).",
    429: "The queue is full: retry after `Retry-After` seconds.",
    503: "The engine is not running (its process exited): the server needs a restart.",
}
_HEADERS = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "required": True, "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "Seconds to wait", "required": True, "schema": {"type": "integer"}}},
}
_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` for these statuses, each with the error shape (and the header it always carries).

    The content is written out rather than given as `model`: FastAPI would file a model under the route's own media
    type, text/plain on the routes that answer text. `install_openapi` adds the `ErrorResponse` schema."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        responses[status] = {"description": _WHEN[status], "content": _ERROR_CONTENT}
        if status in _HEADERS:
            responses[status]["headers"] = _HEADERS[status]
    return responses


# One declaration per route group. 401 only happens with --api-keys; 413 on every JSON or form body. A generation
# route answers JSON, or server-sent events with `"stream": true`.
GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The completion; with `stream: true`, `data: {chunk}` events and a final `data: [DONE]`.",
        "content": {
            "text/event-stream": {
                "itemSchema": {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
            }
        },
    },
    **error_responses(400, 401, 404, 413, 429, 503),
}
LIST_ERRORS = error_responses(401)
ADAPTER_READ_ERRORS = error_responses(401, 404)
ADAPTER_DELETE_ERRORS = error_responses(401, 403, 404)
UPLOAD_ERRORS = error_responses(400, 401, 403, 409, 413, 422)
LOAD_LORA_ERRORS = error_responses(400, 401, 403, 404, 409, 413, 422)
UNLOAD_LORA_ERRORS = error_responses(400, 401, 403, 404, 413)
METRICS_ERRORS = error_responses(401, 403)
HEALTH_ERRORS = error_responses(503)

ADAPTER_ID_SCHEMA = {
    "type": "string",
    "pattern": rf"^(?!\.\.?$){ADAPTER_ID.pattern}$",  # `.` and `..` are refused too (store.check_adapter_id)
    "description": "1 to 128 characters from A-Z, a-z, 0-9, `.`, `_` and `-`",
}
_FILE = {"type": "string", "format": "binary"}

# The upload route reads its multipart body as a stream (upload_body.py), so FastAPI cannot see it: described here.
UPLOAD_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["adapter_id", CONFIG_FILE, WEIGHTS_FILE],
                    "properties": {
                        "adapter_id": ADAPTER_ID_SCHEMA,
                        "public": {"type": "boolean", "default": False},
                        CONFIG_FILE: _FILE,
                        WEIGHTS_FILE: _FILE,
                    },
                    "additionalProperties": False,
                }
            }
        },
    },
}


def install_openapi(app: FastAPI, *, bearer: bool) -> None:
    """Serve the finished document (built once by FastAPI, on the first request for it, and finished here)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            _drop_validation_422(schema)
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(error_schema.pop("$defs"))
            schemas["ErrorResponse"] = error_schema
            if bearer:
                _require_bearer(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the document


def _operations(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [operation for path in schema.get("paths", {}).values() for operation in path.values()]


def _drop_validation_422(schema: dict[str, Any]) -> None:
    ref = "#/components/schemas/HTTPValidationError"
    for operation in _operations(schema):
        response = operation.get("responses", {}).get("422", {})
        if response.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref") == ref:
            del operation["responses"]["422"]
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)


def _require_bearer(schema: dict[str, Any]) -> None:
    schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "A key from the server's --api-keys file",
    }
    for operation in _operations(schema):
        if "401" in operation.get("responses", {}):
            operation["security"] = [{"bearer": []}]
