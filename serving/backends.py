"""The engines that can serve behind the HTTP API, chosen once by `ServeConfig.backend` through one dict.

Each factory returns an object that satisfies `serving.api.app.Engine`; the vLLM one is imported only when chosen,
so the native server never imports vLLM (an optional extra: `pip install switchboard[vllm]`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import TYPE_CHECKING

from switchboard.serving.config import ServeConfig

if TYPE_CHECKING:
    from switchboard.serving.api.app import Engine


def _native(config: ServeConfig) -> Engine:
    """Our engine: its step loop in a process of its own (`--engine-process on`, the default) or in a thread."""
    if config.engine_process:
        from switchboard.serving.engine.core_client import EngineCoreClient

        return EngineCoreClient(config)
    from switchboard.serving.engine.async_engine import AsyncEngine

    return AsyncEngine(config)


def _vllm(config: ServeConfig) -> Engine:
    if importlib.util.find_spec("vllm") is None:  # say how to get it rather than print a traceback
        raise ValueError("--backend vllm needs vLLM: pip install 'switchboard[vllm]' (see docs/scaling.md)")
    from switchboard.serving.vllm_backend.engine import VllmEngine

    return VllmEngine(config)


BACKENDS: dict[str, Callable[[ServeConfig], Engine]] = {"native": _native, "vllm": _vllm}


def create_engine(config: ServeConfig) -> Engine:
    return BACKENDS[config.backend](config)
