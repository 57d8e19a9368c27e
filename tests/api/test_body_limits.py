"""Request bodies are bounded: `--max-request-bytes` refuses larger bodies with 413 in OpenAI's shape, whether
`Content-Length` announces them or they arrive chunked, and adapter uploads keep their own limit. (What hostile
bodies cost a streaming tenant's inter-token latency is a benchmark: `python -m switchboard.bench.hostile`.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .adapter_files import base_shape, lora_files
from .conftest import RunningServer, ServerFactory

LIMIT = 8 * 1024


@pytest.fixture(scope="module")
def small_limit(server_factory: ServerFactory) -> RunningServer:
    return server_factory(max_request_bytes=LIMIT)


def _assert_413(response: httpx.Response) -> None:
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and "--max-request-bytes" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def _chunks(data: bytes, size: int = 8192) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_a_body_over_the_limit_is_413_with_or_without_content_length(small_limit: RunningServer) -> None:
    model = small_limit.engine.model_name
    big = json.dumps({"model": model, "prompt": "x" * (2 * LIMIT), "max_tokens": 1}).encode()
    headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=small_limit.url, timeout=60) as http:
        _assert_413(http.post("/v1/completions", content=big, headers=headers))  # Content-Length
        _assert_413(http.post("/v1/completions", content=_chunks(big), headers=headers))  # chunked
        _assert_413(http.post("/v1/chat/completions", content=_chunks(big), headers=headers))
        ok = http.post("/v1/completions", json={"model": model, "prompt": "x" * (LIMIT // 2), "max_tokens": 1})
        assert ok.status_code in (200, 400), ok.text  # within the limit: answered (400 if the prompt is too long)
        assert ok.status_code != 413


def test_adapter_uploads_keep_their_own_limit(small_limit: RunningServer, tiny_model_dir: Path) -> None:
    files = lora_files(base_shape(tiny_model_dir), rank=8)
    assert sum(map(len, files.values())) > LIMIT  # larger than --max-request-bytes, far below --max-adapter-bytes
    parts = {name: (name, data) for name, data in files.items()}
    with httpx.Client(base_url=small_limit.url, timeout=60) as http:
        response = http.post("/v1/adapters", data={"adapter_id": "big-enough"}, files=parts)
    assert response.status_code == 201, response.text
