"""Adapter routes: upload, list, get, delete (`/v1/adapters`), and vLLM's `load_lora_adapter`/`unload_lora_adapter`.

Uploads are multipart bodies read as a stream: a `Content-Length` over the limit is refused before reading, and a
body that grows past it while streaming is cut off there (413). Parsing, validation and the commit to disk run in a
worker thread (`AdapterRegistry.upload`), never on the event loop or the step thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from switchboard.serving.api.adapter_registry import AdapterRegistry
from switchboard.serving.api.auth import Tenant
from switchboard.serving.api.errors import ApiError, bad_request

FORM_OVERHEAD = 64 * 1024  # boundaries, part headers and the adapter_id field, on top of the files themselves


class LoadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str
    lora_path: str


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str


class _TooLarge(Exception):
    pass


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"The upload is larger than this server's limit of {limit} bytes (--max-adapter-bytes).",
        code="upload_too_large",
    )


async def read_upload(request: Request, max_bytes: int) -> FormData:
    """The multipart form, with the size limit enforced from the header and while streaming."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise bad_request(
            "Upload adapters as multipart/form-data: adapter_id, adapter_config.json, adapter_model.safetensors."
        )
    limit = max_bytes + FORM_OVERHEAD
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large(max_bytes)

    async def limited() -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise _TooLarge
            yield chunk

    parser = MultiPartParser(request.headers, limited(), max_files=4, max_fields=8)
    try:
        form = await parser.parse()
    except _TooLarge:
        raise too_large(max_bytes) from None
    except MultiPartException as exc:
        raise bad_request(f"Malformed multipart body: {exc.message}") from exc
    files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
    if sum(f.size or 0 for f in files) > max_bytes:
        await form.close()
        raise too_large(max_bytes)
    return form


def _flag(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


def adapter_router(
    registry: AdapterRegistry,
    authenticate: Callable[[Request], Tenant],
    max_adapter_bytes: int,
) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/adapters", status_code=201)
    async def upload(request: Request) -> JSONResponse:
        tenant = authenticate(request)
        """Form fields `adapter_id` (and optionally `public`), files adapter_config.json, adapter_model.safetensors;
        query `overwrite=true` makes a new version of an existing id, `public=true` (admin) shares it."""
        form = await read_upload(request, max_adapter_bytes)
        try:
            adapter_id = form.get("adapter_id")
            if not isinstance(adapter_id, str):
                raise bad_request("The form field `adapter_id` is required.", param="adapter_id")
            files: dict[str, Any] = {}
            for field, value in form.multi_items():
                if isinstance(value, UploadFile):
                    files[field if field != "file" else (value.filename or field)] = value.file
            public_field = form.get("public")
            public = _flag(request.query_params.get("public")) or (
                isinstance(public_field, str) and _flag(public_field)
            )
            entry = await asyncio.to_thread(
                registry.upload,
                tenant,
                adapter_id,
                files,
                overwrite=_flag(request.query_params.get("overwrite")),
                public=public,
            )
        finally:
            await form.close()
        return JSONResponse({"object": "adapter", **entry.to_json()}, status_code=201)

    @router.get("/v1/adapters")
    async def list_adapters(request: Request) -> dict[str, Any]:
        tenant = authenticate(request)
        return {"object": "list", "data": [ref.to_json() for ref in registry.visible(tenant)]}

    @router.get("/v1/adapters/{adapter_id}")
    async def get_adapter(adapter_id: str, request: Request) -> dict[str, Any]:
        tenant = authenticate(request)
        return registry.require(tenant, adapter_id).to_json()

    @router.delete("/v1/adapters/{adapter_id}", status_code=204)
    async def delete_adapter(adapter_id: str, request: Request) -> Response:
        tenant = authenticate(request)
        await asyncio.to_thread(registry.delete, tenant, adapter_id)
        return Response(status_code=204)

    @router.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraRequest, request: Request) -> PlainTextResponse:
        tenant = authenticate(request)
        await asyncio.to_thread(registry.import_dir, tenant, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @router.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraRequest, request: Request) -> PlainTextResponse:
        tenant = authenticate(request)
        await asyncio.to_thread(registry.delete, tenant, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return router
