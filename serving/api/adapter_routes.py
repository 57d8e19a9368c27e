"""Adapter routes: upload, list, get, delete (`/v1/adapters`), and vLLM's `load_lora_adapter`/`unload_lora_adapter`.

Uploads stream into a staging directory of the store (`upload_body`), cut off at the size limit (413); validation
and the commit run in a worker thread (`AdapterRegistry.upload`), never on the event loop or the step thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from switchboard.serving.api.adapter_registry import AdapterRegistry
from switchboard.serving.api.auth import Tenant
from switchboard.serving.api.errors import bad_request
from switchboard.serving.api.openapi import (
    ADAPTER_DELETE_ERRORS,
    ADAPTER_ID_SCHEMA,
    ADAPTER_READ_ERRORS,
    LIST_ERRORS,
    LOAD_LORA_ERRORS,
    UNLOAD_LORA_ERRORS,
    UPLOAD_ERRORS,
    UPLOAD_OPENAPI,
)
from switchboard.serving.api.upload_body import read_upload

# The registry checks the id (400 `invalid_adapter_id`); the schema documents the same rule.
AdapterName = Annotated[str, Field(json_schema_extra=ADAPTER_ID_SCHEMA)]


class LoadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: AdapterName
    lora_path: str


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: AdapterName


def _flag(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


def adapter_router(
    registry: AdapterRegistry,
    authenticate: Callable[[Request], Tenant],
    max_adapter_bytes: int,
    route_class: type[APIRoute] = APIRoute,  # the app's (body.json_body_route): load/unload bodies parse off the loop
) -> APIRouter:
    router = APIRouter(route_class=route_class)

    @router.post("/v1/adapters", status_code=201, responses=UPLOAD_ERRORS, openapi_extra=UPLOAD_OPENAPI)
    async def upload(request: Request, overwrite: bool = False, public: bool = False) -> JSONResponse:
        """Form fields `adapter_id` (and optionally `public`), files adapter_config.json, adapter_model.safetensors;
        query `overwrite=true` makes a new version of an existing id, `public=true` (admin) shares it."""
        tenant = authenticate(request)
        with registry.store.staging() as staging:
            form = await read_upload(request, staging, max_adapter_bytes)
            adapter_id = form.fields.get("adapter_id")
            if adapter_id is None:
                raise bad_request("The form field `adapter_id` is required.", param="adapter_id")
            public = public or _flag(form.fields.get("public"))
            entry = await asyncio.to_thread(
                registry.upload,
                tenant,
                adapter_id,
                staging,
                form.files,
                overwrite=overwrite,
                public=public,
            )
        return JSONResponse({"object": "adapter", **entry.to_json()}, status_code=201)

    @router.get("/v1/adapters", responses=LIST_ERRORS)
    async def list_adapters(request: Request) -> dict[str, Any]:
        tenant = authenticate(request)
        return {"object": "list", "data": [ref.to_json() for ref in registry.visible(tenant)]}

    @router.get("/v1/adapters/{adapter_id}", responses=ADAPTER_READ_ERRORS)
    async def get_adapter(adapter_id: str, request: Request) -> dict[str, Any]:
        tenant = authenticate(request)
        return registry.require(tenant, adapter_id).to_json()

    @router.delete("/v1/adapters/{adapter_id}", status_code=204, responses=ADAPTER_DELETE_ERRORS)
    async def delete_adapter(adapter_id: str, request: Request) -> Response:
        tenant = authenticate(request)
        await asyncio.to_thread(registry.delete, tenant, adapter_id)
        return Response(status_code=204)

    @router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=LOAD_LORA_ERRORS)
    async def load_lora_adapter(body: LoadLoraRequest, request: Request) -> PlainTextResponse:
        tenant = authenticate(request)
        await asyncio.to_thread(registry.import_dir, tenant, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=UNLOAD_LORA_ERRORS)
    async def unload_lora_adapter(body: UnloadLoraRequest, request: Request) -> PlainTextResponse:
        tenant = authenticate(request)
        await asyncio.to_thread(registry.delete, tenant, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return router
