"""The two Ray Serve deployments behind `switchboard serve --replicas N`.

- `Router` (the ingress, behind Ray Serve's HTTP proxy): reads the request, computes its affinity key
  (`affinity.py`), and hands it to a `Replica` through a handle with that key as the multiplexed model id, so Ray
  Serve picks a replica that already holds the adapter. A request whose replica died before answering is retried on
  another (generation and reads), or answered 503 with `Retry-After`.
- `Replica` (N copies): one engine and the same FastAPI app as `switchboard serve` runs under uvicorn, called in
  process (`asgi_call.py`); a `serve.multiplexed` LRU of adapter keys (what Ray Serve routes by); the response
  names the replica in `x-switchboard-replica`, and `/metrics` answers every replica's series (`metrics_board.py`).

Every replica opens the one store directory (`--store`, on a filesystem every node mounts): an upload through one
replica is in the manifest every other reads at its next lookup, and a delete leaves no version to route to.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import ray
from fastapi import FastAPI
from prometheus_client import Counter
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from switchboard.serving.api.app import create_app
from switchboard.serving.api.auth import Tenant
from switchboard.serving.api.errors import ApiError
from switchboard.serving.config import ServeConfig
from switchboard.serving.engine.async_engine import AsyncEngine
from switchboard.serving.metrics import PREFIX
from switchboard.serving.replicas.affinity import NO_AFFINITY, AffinityKeys
from switchboard.serving.replicas.asgi_call import HttpRequest, ResponseStart, call_asgi
from switchboard.serving.replicas.metrics_board import BOARD_NAME, label_families

logger = logging.getLogger(__name__)

NAMESPACE = "switchboard"
REPLICA_HEADER = b"x-switchboard-replica"
METRICS_PUSH_S = 1.0
# A request whose replica died before it answered is sent again, this many times in all, with this pause between.
ATTEMPTS = 4
RETRY_PAUSE_S = 0.5
RETRY_AFTER_S = 2
RETRYABLE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})

_loads: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("switchboard_adapter_loads", default=None)


class Replica:
    """One engine and its app; Ray Serve runs N of these and routes by adapter key."""

    async def __init__(self, config: ServeConfig) -> None:
        self.name = serve.get_replica_context().replica_id.unique_id
        self.app = build_app(config)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # starts the engine, as uvicorn's lifespan would
        self.registry = self.app.state.adapters
        metrics = self.app.state.metrics
        self.affinity = Counter(
            PREFIX + "replica_adapter_requests",
            "Requests naming an adapter, by whether this replica already held its key (hit) or loaded it (load).",
            ["result"],
            registry=metrics.registry,
        )

        async def load(key: str) -> str:  # a plain function: Serve keeps its LRU on the function object
            return await self._load(key)

        self.resident = serve.multiplexed(max_num_models_per_replica=config.max_resident_adapters)(load)
        self.board = ray.get_actor(BOARD_NAME, namespace=NAMESPACE)
        self._pusher = asyncio.create_task(self._push_metrics())
        print(f"switchboard: replica {self.name} pid {os.getpid()} ready", flush=True)  # the operator's map of both

    async def _load(self, key: str) -> str:
        """Serve's multiplex loader (on a key this replica does not hold): parse a stored version into the host tier,
        so that the requests routed here after it find it parsed."""
        loads = _loads.get()
        if loads is not None:
            loads.append(key)
        tenant, _, version = key.partition(":")
        ref = self.registry.lookup(Tenant(tenant), _adapter_id(version))
        if ref is not None and ref.key == version:
            with contextlib.suppress(ApiError):  # deleted meanwhile: the request itself answers 404
                await asyncio.get_running_loop().run_in_executor(None, self.registry.parsed, ref)
        return key

    async def handle(self, request: HttpRequest) -> AsyncIterator[ResponseStart | bytes]:
        """The response to `request`, as `call_asgi` streams it, with this replica's name among its headers."""
        key = serve.get_multiplexed_model_id()
        if key != NO_AFFINITY:
            loads: list[str] = []
            token = _loads.set(loads)
            try:
                await self.resident(key)
            finally:
                _loads.reset(token)
            self.affinity.labels(result="load" if loads else "hit").inc()
        if request.path == "/metrics":
            async for part in self._metrics(request):
                yield part
            return
        async for part in call_asgi(self.app, request):
            if isinstance(part, ResponseStart):
                part.headers.append((REPLICA_HEADER, self.name.encode()))
            yield part

    async def _metrics(self, request: HttpRequest) -> AsyncIterator[ResponseStart | bytes]:
        """The app answers who may read /metrics (401/403 as with one process); the page is every replica's."""
        parts = [part async for part in call_asgi(self.app, request)]
        start = parts[0]
        assert isinstance(start, ResponseStart)
        if start.status != 200:
            yield from_start(start, self.name)
            for part in parts[1:]:
                yield part
            return
        await self._push_once()
        page: bytes = await self.board.render.remote()
        headers = [(k, v) for k, v in start.headers if k.lower() != b"content-length"]
        headers += [(b"content-length", str(len(page)).encode()), (REPLICA_HEADER, self.name.encode())]
        yield ResponseStart(200, headers)
        yield page

    async def _push_once(self) -> None:
        families = label_families(self.app.state.metrics.render().decode(), self.name)
        await self.board.push.remote(self.name, families)

    async def _push_metrics(self) -> None:
        while True:
            try:
                await self._push_once()
            except (RayActorError, ActorUnavailableError):  # the board is gone: the deployment is shutting down
                logger.debug("metrics board unavailable", exc_info=True)
            await asyncio.sleep(METRICS_PUSH_S)

    async def __del__(self) -> None:
        """Ray Serve's graceful stop: leave the metrics page, stop the engine."""
        self._pusher.cancel()
        with contextlib.suppress(Exception):
            await self.board.remove.remote(self.name)
        await self._lifespan.__aexit__(None, None, None)


def build_app(config: ServeConfig) -> FastAPI:
    """The engine and app one replica runs: where another engine (the vLLM backend) plugs in, as in `serve`."""
    return create_app(AsyncEngine(config), config)


def from_start(start: ResponseStart, name: str) -> ResponseStart:
    return ResponseStart(start.status, [*start.headers, (REPLICA_HEADER, name.encode())])


def _adapter_id(version: str) -> str:
    """The adapter id in a version key (`owner/id@sha`), or the name of a start-up adapter."""
    owner_and_id, _, _ = version.rpartition("@")
    return owner_and_id.partition("/")[2] if owner_and_id else version


class Router:
    """The ingress: each request to the replica that holds its adapter; a dead replica's unanswered ones elsewhere."""

    def __init__(self, replica: DeploymentHandle, config: ServeConfig) -> None:
        self.replica = replica
        self.keys = AffinityKeys(config)

    async def __call__(self, request: Request) -> Response:
        forwarded = HttpRequest(
            method=request.method,
            path=request.url.path,
            query_string=request.scope.get("query_string", b""),
            headers=list(request.scope["headers"]),
            body=await request.body(),
            client=tuple(request.client) if request.client else None,
        )
        key = await asyncio.to_thread(self.keys.key, forwarded)  # a stat of the manifest, maybe a JSON parse
        retryable = forwarded.method == "GET" or forwarded.path in RETRYABLE_PATHS
        for attempt in range(ATTEMPTS):
            parts = self.replica.options(multiplexed_model_id=key, stream=True).handle.remote(forwarded)
            try:
                start = await parts.__anext__()
                assert isinstance(start, ResponseStart)
                if not _is_event_stream(start):
                    # A whole body or nothing: a replica lost between its headers and its body would otherwise
                    # leave the client a Content-Length it never receives.
                    body = await _whole(parts)
                    response = Response(body, status_code=start.status)
                    response.raw_headers = start.headers
                    return response
            except (RayActorError, ActorUnavailableError):
                logger.warning("replica lost before answering %s (attempt %d)", forwarded.path, attempt + 1)
                if not retryable:
                    break
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            response = StreamingResponse(_rest(parts), status_code=start.status)
            response.raw_headers = start.headers
            return response
        return _unavailable()


async def _whole(parts: Any) -> bytes:
    """The rest of a buffered response; a client that leaves meanwhile cancels the replica's call too."""
    try:
        return b"".join([chunk async for chunk in parts])
    except asyncio.CancelledError:
        parts.cancel()
        raise


def _is_event_stream(start: ResponseStart) -> bool:
    return dict(start.headers).get(b"content-type", b"").startswith(b"text/event-stream")


async def _rest(parts: Any) -> AsyncIterator[bytes]:
    """An event stream's body after its start; a replica lost mid-stream ends it with an error event. A client that
    leaves ends the replica's generation too (cancelling the call, as one process's disconnect does)."""
    finished = False
    try:
        async for chunk in parts:
            yield chunk
        finished = True
    except (RayActorError, ActorUnavailableError):
        finished = True
        logger.warning("replica lost while streaming a response")
        yield b"data: " + json.dumps(_error_body()).encode() + b"\n\n"
    finally:
        if not finished:
            parts.cancel()


def _error_body() -> dict[str, Any]:
    return {
        "error": {
            "message": "The replica serving this request stopped; retry it.",
            "type": "service_unavailable",
            "param": None,
            "code": "replica_unavailable",
        }
    }


def _unavailable() -> Response:
    return Response(
        json.dumps(_error_body()),
        status_code=503,
        media_type="application/json",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )
