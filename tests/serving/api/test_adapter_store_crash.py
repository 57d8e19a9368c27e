"""A `switchboard serve` process killed (SIGKILL) in the middle of an upload: after a restart on the same store the
half-sent adapter is nowhere (not listed, not in the manifest, no staged or orphan file), and what was uploaded
before is served as it was."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from switchboard.adapters_store.kinds.base import CONFIG_FILE, WEIGHTS_FILE

from ...serve_process import ServeProcess
from .adapter_files import base_shape, lora_files, upload

# As an operator would start it; the store is the test's and survives the restart.
FLAGS = ("--dtype", "float32", "--device", "cpu", "--max-model-len", "256", "--num-kv-blocks", "64",
         "--log-level", "warning")  # fmt: skip


@pytest.fixture()
def processes() -> Iterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for p in started:
        p.stop(signal.SIGKILL)


def _half_sent_upload(url: str, adapter_id: str, files: dict[str, bytes]) -> socket.socket:
    """Send the headers and the first half of the weights file, then stall (the socket stays open)."""
    boundary = "crashtestboundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="adapter_id"\r\n\r\n{adapter_id}\r\n'.encode()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        head += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        if name == CONFIG_FILE:
            head += files[name] + b"\r\n"
    weights = files[WEIGHTS_FILE]
    total = len(head) + len(weights) + len(f"\r\n--{boundary}--\r\n")
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    request = (
        f"POST /v1/adapters HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {total}\r\n\r\n"
    ).encode()
    sock.sendall(request + head + weights[: len(weights) // 2])
    return sock


def _completion(url: str, model: str) -> str:
    with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60) as client:
        out = client.completions.create(model=model, prompt="hello", max_tokens=6, temperature=0)
    return out.choices[0].text


def test_sigkill_mid_upload_leaves_nothing_visible(
    processes: list[ServeProcess], tiny_model_dir: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    shape = base_shape(tiny_model_dir)
    first = ServeProcess(tmp_path, tiny_model_dir, *FLAGS, store=store)
    processes.append(first)
    with httpx.Client(base_url=first.url, timeout=60) as http:
        kept = upload(http, "kept", lora_files(shape, seed=1))
        assert kept.status_code == 201
    kept_text = _completion(first.url, "kept")
    sock = _half_sent_upload(first.url, "half", lora_files(shape, seed=2))
    staged = store / "tmp"
    deadline = time.monotonic() + 30
    while not any(staged.glob(f"*/{WEIGHTS_FILE}")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(staged.glob(f"*/{WEIGHTS_FILE}")), "the server never started writing the upload"
    first.stop(signal.SIGKILL)
    sock.close()
    assert any(staged.iterdir())  # the kill did leave a half-written file behind

    second = ServeProcess(tmp_path, tiny_model_dir, *FLAGS, store=store)
    processes.append(second)
    with httpx.Client(base_url=second.url, timeout=60) as http:
        assert [a["id"] for a in http.get("/v1/adapters").json()["data"]] == ["kept"]
        assert http.get("/v1/adapters/half").status_code == 404
    manifest = json.loads((store / "manifest.json").read_text())
    assert [a["id"] for a in manifest["adapters"]] == ["kept"]
    assert list(staged.iterdir()) == []
    assert [p.name for p in (store / "blobs").iterdir()] == [kept.json()["sha256"]]
    assert _completion(second.url, "kept") == kept_text
    second.stop()
