"""Which replica pool entry a request belongs to: its multiplexed model id, `tenant:adapter-version`.

Ray Serve routes a request whose multiplexed model id some replica has loaded to that replica, so every request for
one adapter version lands where the adapter already sits (its host copy and device slot). The key carries the
tenant and the version (`owner/id@sha`, `StoredAdapter.key`): an overwrite is a new key, a delete leaves no key.
Requests for the base model, and any the replica will refuse (bad JSON, unknown adapter, wrong key), get the empty
key: plain load balancing, and the replica answers them exactly as one process would.
"""

from __future__ import annotations

import json

from starlette.requests import Request

from switchboard.adapters_store.kinds import BaseModelShape
from switchboard.adapters_store.store import AdapterStore
from switchboard.serving.adapters.host_cache import HostCache
from switchboard.serving.api.adapter_registry import AdapterRegistry
from switchboard.serving.api.auth import Authenticator, read_api_keys
from switchboard.serving.api.errors import ApiError
from switchboard.serving.api.resolve import resolve_model
from switchboard.serving.config import ServeConfig
from switchboard.serving.replicas.asgi_call import HttpRequest

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
NO_AFFINITY = ""


class AffinityKeys:
    """The router's read-only view of tenants and the shared store, answering each request's key."""

    def __init__(self, config: ServeConfig) -> None:
        self._authenticate = Authenticator(read_api_keys(config.api_keys) if config.api_keys is not None else None)
        base = BaseModelShape.from_hf_config(json.loads((config.model / "config.json").read_text()))
        # The visibility rules are the registry's own (own, start-up, public); it never parses or writes here.
        self._registry = AdapterRegistry(
            config,
            AdapterStore(config.store),
            dict.fromkeys(config.adapters, "startup"),
            base,
            HostCache(1),
            retire=lambda _: None,
        )
        self._base_model = config.served_model_name or config.model.name
        self._merged = config.merge_adapter

    def key(self, request: HttpRequest) -> str:
        """`tenant:adapter-key` for a generation request naming an adapter the caller may use, else ''."""
        if request.method != "POST" or request.path not in GENERATION_PATHS:
            return NO_AFFINITY
        try:
            tenant = self._authenticate(Request({"type": "http", "headers": request.headers}))
            body = json.loads(request.body)
        except (ApiError, ValueError):  # the replica answers 401 or 400 with the reason
            return NO_AFFINITY
        if not isinstance(body, dict):
            return NO_AFFINITY
        model, adapter_id = body.get("model"), body.get("adapter_id")
        if not isinstance(model, str | None) or not isinstance(adapter_id, str | None):
            return NO_AFFINITY
        try:
            resolved = resolve_model(
                model,
                adapter_id,
                base_model=self._base_model,
                adapter_exists=lambda name: self._registry.lookup(tenant, name) is not None,
                merged_adapter=self._merged,
            )
        except ApiError:
            return NO_AFFINITY
        if resolved.adapter_id is None:
            return NO_AFFINITY
        ref = self._registry.lookup(tenant, resolved.adapter_id)
        return NO_AFFINITY if ref is None else f"{tenant.name}:{ref.key}"
