"""The HTTP API in front of vLLM (`switchboard serve --backend vllm`), through the real `openai` client and httpx:
completions, chat, streaming, /v1/models, uploads and versions, and 422 for the kinds vLLM cannot serve."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from ..serve_process import ServeProcess

pytest.importorskip("vllm", reason="the vLLM backend's tests run in `make test-vllm` (vLLM's own venv)")

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
LONG = 200  # tokens: a request that is still running when an upload that overwrites its adapter commits


@pytest.fixture()
def client(vllm_server: ServeProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{vllm_server.url}/v1", api_key="x", max_retries=0, timeout=120) as c:
        yield c


def upload(server: ServeProcess, adapter_id: str, directory: Path, *, overwrite: bool = False) -> httpx.Response:
    files = {name: (name, (directory / name).read_bytes()) for name in PEFT_FILES}
    params = {"overwrite": "true"} if overwrite else {}
    return httpx.post(
        f"{server.url}/v1/adapters", data={"adapter_id": adapter_id}, files=files, params=params, timeout=60
    )


def greedy(client: openai.OpenAI, model: str, max_tokens: int = 16, prompt: str = "def fibonacci(n):") -> str:
    out = client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == max_tokens
    return out.choices[0].text


def test_completions_and_chat(client: openai.OpenAI, vllm_model_dir: Path) -> None:
    base = greedy(client, vllm_model_dir.name)
    lora = greedy(client, "lora")
    assert lora != base  # the adapter changes the output
    assert greedy(client, vllm_model_dir.name) == base  # greedy is deterministic
    out = client.completions.create(model="lora", prompt=["a", "b"], max_tokens=4, temperature=0)
    assert [c.index for c in out.choices] == [0, 1] and out.model == "lora"
    chat = client.chat.completions.create(
        model=vllm_model_dir.name, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 8 or chat.choices[0].finish_reason == "stop"
    sampled = client.completions.create(model="lora", prompt="x", max_tokens=8, temperature=1.0, n=3, seed=7)
    assert len(sampled.choices) == 3


def test_streaming_matches_the_whole_response(client: openai.OpenAI) -> None:
    whole = greedy(client, "lora", max_tokens=12)
    stream = client.completions.create(
        model="lora",
        prompt="def fibonacci(n):",
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    chat = client.chat.completions.create(
        model="lora", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, stream=True
    )
    assert [c.choices[0].finish_reason for c in chat if c.choices][-1] in ("length", "stop")


def test_models_lists_the_base_and_every_adapter_with_its_kind(
    client: openai.OpenAI, vllm_model_dir: Path, vllm_server: ServeProcess
) -> None:
    cards = {m.id: m for m in client.models.list().data}
    assert {vllm_model_dir.name, "lora", "ia3"} <= set(cards)
    body = httpx.get(f"{vllm_server.url}/v1/models").json()
    kinds = {m["id"]: m.get("kind") for m in body["data"]}
    assert kinds["lora"] == "lora" and kinds["ia3"] == "ia3"


@pytest.mark.parametrize("kind", ["ia3", "prefix", "krona"])
def test_kinds_vllm_cannot_serve_are_refused_at_upload(
    kind: str, vllm_server: ServeProcess, vllm_adapters: dict[str, Path]
) -> None:
    r = upload(vllm_server, f"up-{kind}", vllm_adapters[kind])
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "LoRA adapters only" in error["message"] and kind in error["message"]
    assert httpx.get(f"{vllm_server.url}/v1/adapters/up-{kind}").status_code == 404


def test_a_start_up_adapter_of_another_kind_is_refused_at_request_time(
    client: openai.OpenAI, vllm_model_dir: Path
) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.completions.create(model="ia3", prompt="x", max_tokens=4)
    body = info.value.response.json()["error"]
    assert body["code"] == "unsupported_adapter_kind" and "LoRA adapters only" in body["message"]
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(
            model=vllm_model_dir.name, messages=[{"role": "user", "content": "x"}], extra_body={"adapter_id": "ia3"}
        )


def test_upload_overwrite_and_delete(
    client: openai.OpenAI, vllm_server: ServeProcess, vllm_adapters: dict[str, Path]
) -> None:
    """An upload serves at once; an overwrite is a new version (a new LoRA id: the new weights' tokens); a request
    streaming on the old version when it is overwritten finishes on the old one; a delete answers 404 after."""
    r = upload(vllm_server, "tenant-lora", vllm_adapters["lora"])
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == "lora"
    v1 = greedy(client, "tenant-lora", max_tokens=LONG)
    assert v1 == greedy(client, "lora", max_tokens=LONG)

    stream = client.completions.create(
        model="tenant-lora",
        prompt="def fibonacci(n):",
        max_tokens=LONG,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    texts = [next(iter(stream)).choices[0].text]  # the request is running on version 1
    overwritten: list[tuple[httpx.Response, float]] = []

    def overwrite() -> None:
        response = upload(vllm_server, "tenant-lora", vllm_adapters["lora-v2"], overwrite=True)
        overwritten.append((response, time.monotonic()))

    thread = threading.Thread(target=overwrite)
    thread.start()
    texts += [c.choices[0].text for c in stream if c.choices]
    last_chunk_at = time.monotonic()
    thread.join()
    response, overwritten_at = overwritten[0]
    assert response.status_code == 201, response.text
    assert overwritten_at < last_chunk_at  # the overwrite landed while the request ran
    assert "".join(texts) == v1  # and it kept version 1 to the end

    v2 = greedy(client, "tenant-lora", max_tokens=LONG)
    assert v2 != v1
    assert httpx.delete(f"{vllm_server.url}/v1/adapters/tenant-lora").status_code == 204
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tenant-lora", prompt="x", max_tokens=4)


def test_vllm_style_load_lora_adapter_is_refused_without_import_dir(vllm_server: ServeProcess) -> None:
    r = httpx.post(f"{vllm_server.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"})
    assert r.status_code == 403, r.text


def test_metrics_and_bad_requests(client: openai.OpenAI, vllm_server: ServeProcess) -> None:
    greedy(client, "lora", max_tokens=4)
    text = httpx.get(f"{vllm_server.url}/metrics").text
    assert "switchboard_kv_cache_blocks_total" in text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(samples["switchboard_kv_cache_blocks_total"]) > 0
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="lora", prompt="x" * 5000, max_tokens=4)
    r = httpx.post(f"{vllm_server.url}/v1/completions", content=json.dumps({"prompt": "x", "max_tokens": 0}))
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
