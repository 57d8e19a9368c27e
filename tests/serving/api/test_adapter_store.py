"""Uploaded adapters through a real server: upload, use with the openai client, list, get, overwrite while a request
runs on the old version, delete (running requests finish, new ones get 404), restart on the same store."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import openai
import pytest

from .adapter_files import base_shape, dir_files, lora_files, upload
from .conftest import RunningServer, ServerFactory

PROMPT = "def main():"


@pytest.fixture(scope="module")
def store_server(server_factory: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    return server_factory(store=tmp_path_factory.mktemp("store"), max_resident_adapters=2, metrics_per_adapter=True)


@pytest.fixture()
def http(store_server: RunningServer):
    with httpx.Client(base_url=store_server.url, timeout=60) as c:
        yield c


@pytest.fixture()
def client(store_server: RunningServer):
    with openai.OpenAI(base_url=store_server.api_url, api_key="x", max_retries=0, timeout=60) as c:
        yield c


def _text(client: openai.OpenAI, model: str, max_tokens: int = 8, **extra: object) -> str:
    out = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True, **extra}
    )
    return out.choices[0].text


def test_upload_use_list_get_delete(
    http: httpx.Client, client: openai.OpenAI, store_server: RunningServer, peft_adapters: dict[str, Path]
) -> None:
    base = store_server.engine.model_name
    resp = upload(http, "my-lora", dir_files(peft_adapters["lora"]))
    assert resp.status_code == 201, resp.text
    card = resp.json()
    assert card["id"] == "my-lora" and card["kind"] == "lora" and card["rank"] == 8 and card["version"] == 1
    assert len(card["sha256"]) == 64 and card["owner"] == "default" and card["size_bytes"] > 0
    assert card["num_parameters"] > 0 and "q_proj" in card["target_modules"] and card["created"] > 0
    # used at once, by model name and by adapter_id, and it changes the output
    text = _text(client, "my-lora")
    assert text == _text(client, base, adapter_id="my-lora") != _text(client, base)
    chat = client.chat.completions.create(model="my-lora", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.model == "my-lora"
    models = {m.id: m.model_dump() for m in client.models.list().data}
    assert models["my-lora"]["parent"] == base and models["my-lora"]["kind"] == "lora"
    assert [a["id"] for a in http.get("/v1/adapters").json()["data"]] == ["my-lora"]
    assert http.get("/v1/adapters/my-lora").json()["sha256"] == card["sha256"]
    # same id again: 409 unless overwrite
    again = upload(http, "my-lora", dir_files(peft_adapters["lora"]))
    assert again.status_code == 409 and again.json()["error"]["code"] == "adapter_exists"
    assert http.delete("/v1/adapters/my-lora").status_code == 204
    assert http.get("/v1/adapters/my-lora").status_code == 404
    assert http.delete("/v1/adapters/my-lora").status_code == 404
    with pytest.raises(openai.NotFoundError):
        _text(client, "my-lora")
    with pytest.raises(openai.NotFoundError):
        _text(client, base, adapter_id="my-lora")
    assert "my-lora" not in {m.id for m in client.models.list().data}


def test_every_kind_uploads_and_matches_the_start_up_adapter(
    server_factory: ServerFactory, http: httpx.Client, client: openai.OpenAI, peft_adapters: dict[str, Path]
) -> None:
    names = ["lokr-full", "ia3", "prefix"]
    reference = server_factory(adapters={n: peft_adapters[n] for n in names})
    with openai.OpenAI(base_url=reference.api_url, api_key="x", max_retries=0) as ref_client:
        for name in names:
            assert upload(http, f"up-{name}", dir_files(peft_adapters[name])).status_code == 201
            assert _text(client, f"up-{name}") == _text(ref_client, name)
            assert http.delete(f"/v1/adapters/up-{name}").status_code == 204


def _stream_until_done(client: openai.OpenAI, model: str, max_tokens: int, started: threading.Event, out: list[str]):
    stream = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    for chunk in stream:
        out.append(chunk.choices[0].text if chunk.choices else "")
        started.set()


def test_overwrite_and_delete_while_a_request_runs(
    http: httpx.Client, client: openai.OpenAI, store_server: RunningServer, tiny_model_dir: Path
) -> None:
    shape = base_shape(tiny_model_dir)
    v1, v2 = lora_files(shape, seed=1), lora_files(shape, seed=2)
    assert upload(http, "ref-v1", v1).status_code == 201
    assert upload(http, "ref-v2", v2).status_code == 201
    long_tokens = 600
    expected_v1 = _text(client, "ref-v1", max_tokens=long_tokens)
    expected_v2 = _text(client, "ref-v2")
    assert expected_v1[: len(expected_v2)] != expected_v2

    assert upload(http, "live", v1).status_code == 201
    started, pieces = threading.Event(), []
    runner = threading.Thread(target=_stream_until_done, args=(client, "live", long_tokens, started, pieces))
    runner.start()
    assert started.wait(30)
    resp = upload(http, "live", v2, overwrite=True)
    assert resp.status_code == 201 and resp.json()["version"] == 2
    assert _text(client, "live") == expected_v2  # the next request uses the new version
    info = next(line for line in http.get("/metrics").text.splitlines() if line.startswith("vllm:lora_requests_info{"))
    assert runner.is_alive(), "the long request ended before the overwrite: make it longer"
    assert 'max_lora="2"' in info and 'running_lora_adapters="live"' in info
    # delete while it still runs: new requests 404, the running one finishes on version 1
    assert http.delete("/v1/adapters/live").status_code == 204
    with pytest.raises(openai.NotFoundError):
        _text(client, "live")
    runner.join(60)
    assert "".join(pieces) == expected_v1


def test_restart_serves_what_was_uploaded(server_factory: ServerFactory, tmp_path: Path, tiny_model_dir: Path) -> None:
    files = lora_files(base_shape(tiny_model_dir), seed=7)
    first = server_factory(store=tmp_path)
    with httpx.Client(base_url=first.url, timeout=60) as h:
        assert upload(h, "kept", files).status_code == 201
    with openai.OpenAI(base_url=first.api_url, api_key="x", max_retries=0) as c:
        before = _text(c, "kept")
    first.stop()
    second = server_factory(store=tmp_path)
    with openai.OpenAI(base_url=second.api_url, api_key="x", max_retries=0) as c:
        assert _text(c, "kept") == before
        assert "kept" in {m.id for m in c.models.list().data}
