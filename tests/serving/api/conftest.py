"""Real servers for the API tests: the real engine on the tiny model, served by uvicorn on a free local port.

Each server runs in-process in a background thread (its own event loop, as `switchboard serve` would run it),
listening on a socket bound here first, so there is no race for the port. Start-up waits for `/health`; tear-down
asks uvicorn to exit and joins the thread (the app's lifespan shuts the engine down).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from switchboard.serving.api.app import create_app
from switchboard.serving.backends import create_engine
from switchboard.serving.config import ServeConfig
from switchboard.serving.engine.async_engine import AsyncEngine
from switchboard.serving.engine.core_client import EngineCoreClient

MAX_MODEL_LEN = 2048  # long enough that a request left running after its client left takes seconds
STARTUP_TIMEOUT_S = 60.0


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    engine: EngineCoreClient | AsyncEngine  # the engine core process with engine_process=True
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def api_url(self) -> str:
        return f"{self.url}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout=10)


def start_server(config: ServeConfig) -> RunningServer:
    engine = create_engine(config)
    app = create_app(engine, config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    running = RunningServer(f"http://127.0.0.1:{port}", engine, server, thread)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError("the server thread exited during start-up (see the log above)")
        if server.started:
            try:
                if httpx.get(f"{running.url}/health", timeout=2).status_code == 200:
                    return running
            except httpx.TransportError:
                pass
        time.sleep(0.05)
    running.stop()
    raise RuntimeError(f"the server did not answer /health within {STARTUP_TIMEOUT_S} s")


def serve_config(model_dir: Path, **overrides: object) -> ServeConfig:
    settings: dict[str, object] = {
        "dtype": "float32",
        "device": "cpu",
        "max_model_len": MAX_MODEL_LEN,
        "max_num_seqs": 16,
        "num_kv_blocks": 2048,  # 16 sequences of the whole context (16 MiB on the tiny model)
        "block_size": 16,
    }
    settings.update(overrides)
    return ServeConfig(model=model_dir, **settings)  # type: ignore[arg-type]


ServerFactory = Callable[..., RunningServer]


@pytest.fixture(scope="session")
def server_factory(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Start a server on the tiny model with `ServeConfig` overrides (each on its own empty adapter store unless
    `store` is given); every one is stopped at the end."""
    started: list[RunningServer] = []

    def start(**overrides: object) -> RunningServer:
        overrides.setdefault("store", tmp_path_factory.mktemp("store"))
        started.append(start_server(serve_config(tiny_model_dir, **overrides)))
        return started[-1]

    yield start
    for running in started:
        running.stop()


@pytest.fixture(scope="session")
def server(server_factory: ServerFactory) -> RunningServer:
    return server_factory()


@pytest.fixture(scope="session")
def model_name(server: RunningServer) -> str:
    return server.engine.model_name


@pytest.fixture()
def client(server: RunningServer) -> Iterator[openai.OpenAI]:
    # No retries: a 429 or 5xx must fail the test that caused it, not be retried into a pass.
    with openai.OpenAI(base_url=server.api_url, api_key="x", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture()
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
