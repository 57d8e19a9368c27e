"""Which model a request means: the base model or an adapter (`model` and `adapter_id`), and the `/v1/models` list.

`AdapterLookup` answers whether an adapter id exists for the caller (the start-up adapters and the tenant's own and
public ones in the store). With `--merge-adapter`, the base model itself is not served.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from switchboard.serving.api.errors import ApiError, bad_request, check_text

# adapter id -> whether an adapter with that id exists and the caller may use it.
AdapterLookup = Callable[[str], bool]


def no_adapters(_: str) -> bool:
    return False


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    adapter_id: str | None  # None: the base model
    name: str  # what responses report as `model`: the adapter id, or the base model's name


def resolve_model(
    model: str | None,
    adapter_id: str | None,
    *,
    base_model: str,
    adapter_exists: AdapterLookup = no_adapters,
    merged_adapter: str | None = None,
) -> ResolvedModel:
    """Resolve a request's `model` and `adapter_id` (the vLLM and LoRAX convention).

    - `adapter_id` set: that adapter (404 `adapter_not_found` if unknown); `model` must then be absent, the base
      model, or the same adapter.
    - `adapter_id` absent: `model` absent or the base model means the base model; `model` naming an adapter means
      that adapter; anything else is 404 `model_not_found`.
    """
    check_text(model or "", param="model")
    check_text(adapter_id or "", param="adapter_id")
    if adapter_id == "":
        raise bad_request(
            "`adapter_id` is empty; leave it out (or null) for the base model, or name an adapter.", param="adapter_id"
        )
    if adapter_id is not None:
        if not adapter_exists(adapter_id):
            raise ApiError(
                404, f"The adapter `{adapter_id}` does not exist.", code="adapter_not_found", param="adapter_id"
            )
        if model not in (None, base_model, adapter_id):
            if adapter_exists(model):
                raise bad_request(
                    f"`model` names the adapter `{model}` and `adapter_id` the adapter `{adapter_id}`; a request uses "
                    f"one adapter: name it in either field, or in both, or set `model` to the base model "
                    f"`{base_model}`.",
                    param="adapter_id",
                    code="adapter_conflict",
                )
            raise ApiError(404, f"The model `{model}` does not exist.", code="model_not_found", param="model")
        return ResolvedModel(adapter_id=adapter_id, name=adapter_id)
    if model is None or model == base_model:
        if merged_adapter is not None:
            raise ApiError(
                404,
                f"The base model is not served: adapter `{merged_adapter}` is merged into its weights; "
                f"use model `{merged_adapter}`.",
                code="model_not_found",
                param="model",
            )
        return ResolvedModel(adapter_id=None, name=base_model)
    if adapter_exists(model):
        return ResolvedModel(adapter_id=model, name=model)
    raise ApiError(404, f"The model `{model}` does not exist.", code="model_not_found", param="model")


def model_cards(
    base_model: str,
    max_model_len: int,
    created: int | None = None,
    adapters: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The `/v1/models` entries: the base model, then each adapter (id -> kind) with `parent` and `kind`."""
    created = created if created is not None else int(time.time())
    base = {"object": "model", "created": created, "owned_by": "switchboard", "max_model_len": max_model_len}
    cards = [{"id": base_model, **base}]
    for name, kind in sorted((adapters or {}).items()):
        cards.append({"id": name, **base, "parent": base_model, "root": base_model, "kind": kind})
    return cards
