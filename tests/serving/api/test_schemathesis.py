"""The OpenAPI document against the server (issue 14): Schemathesis generates requests from `/openapi.json`, valid and
invalid, and runs every check on the answers. No request may get a 5xx, and every answer's status, content type,
headers and body must be ones the document lists.

The run is bounded (a fixed seed, a few examples per operation, one worker) and the server's context is short, so a
huge `max_tokens` is a quick 400 and a valid one generates at most a few dozen tokens.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .conftest import RunningServer, ServerFactory

CONFIG = Path(__file__).with_name("schemathesis.toml")
SEED = 14
MAX_EXAMPLES = 20  # per operation and phase: about 40 s on 2 idle CPUs, 70 s on busy ones
TIMEOUT_S = 300
KEYS = "sk-admin admin admin\nsk-alice alice\n"
JSON_POSTS = ["/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"]


@pytest.fixture(scope="module")
def keyed_server(server_factory: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    root = tmp_path_factory.mktemp("schemathesis-server")
    (root / "keys").write_text(KEYS, encoding="utf-8")
    (root / "import").mkdir()
    return server_factory(api_keys=root / "keys", import_dir=root / "import", max_model_len=64)


def openapi(server: RunningServer) -> dict:
    resp = httpx.get(f"{server.url}/openapi.json", timeout=30)
    assert resp.status_code == 200
    return resp.json()


def test_document_lists_errors_in_one_shape(keyed_server: RunningServer) -> None:
    doc = openapi(keyed_server)
    assert "HTTPValidationError" not in doc["components"]["schemas"]  # validation errors are 400, not FastAPI's 422
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            errors = {status: r for status, r in operation["responses"].items() if status.startswith(("4", "5"))}
            for status, response in errors.items():
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)
            # With --api-keys, an operation needs the key exactly when it can answer 401.
            assert ("security" in operation) == ("401" in errors), (method, path)
    for path in JSON_POSTS:  # the body is described (413 comes from the request-size limit)
        operation = doc["paths"][path]["post"]
        assert "application/json" in operation["requestBody"]["content"], path
        assert {"400", "401", "413"} <= set(operation["responses"]), path
    assert "multipart/form-data" in doc["paths"]["/v1/adapters"]["post"]["requestBody"]["content"]


def test_open_server_needs_no_key(server: RunningServer) -> None:
    doc = openapi(server)
    assert "securitySchemes" not in doc["components"]
    assert not any("security" in op for operations in doc["paths"].values() for op in operations.values())


@pytest.mark.slow
def test_schemathesis_all_checks(keyed_server: RunningServer, tmp_path: Path) -> None:
    command = [
        *(sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "--no-color", "run"),
        f"{keyed_server.url}/openapi.json",
        *("--checks", "all", "--header", "Authorization: Bearer sk-admin"),
        *("--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1", "--request-timeout", "60"),
    ]
    # Its example database and cache go to the working directory: the test's own.
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-20000:]
    assert "generated" in output and " passed" in output, output[-5000:]
