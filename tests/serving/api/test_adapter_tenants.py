"""Two tenants and an admin (`--api-keys`): every cross-tenant list, use, get and delete answers 404 as if absent;
an adapter the admin publishes is usable by both; missing or wrong keys answer 401."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from .adapter_files import base_shape, lora_files, upload
from .conftest import RunningServer, ServerFactory

KEYS = {"alice": "key-alice", "bob": "key-bob", "ops": "key-ops"}


@pytest.fixture(scope="module")
def tenant_server(server_factory: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text("# KEY TENANT [admin]\nkey-alice alice\nkey-bob bob\nkey-ops ops admin\n")
    return server_factory(api_keys=keys)


def _http(server: RunningServer, tenant: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}
    return httpx.Client(base_url=server.url, timeout=60, headers=headers)


def _client(server: RunningServer, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key=KEYS[tenant], max_retries=0, timeout=60)


def _complete(client: openai.OpenAI, model: str, **extra: object) -> str:
    out = client.completions.create(model=model, prompt="hello", max_tokens=6, temperature=0, extra_body=extra)
    return out.choices[0].text


def test_tenants_cannot_see_use_get_or_delete_each_others_adapters(
    tenant_server: RunningServer, tiny_model_dir: Path
) -> None:
    shape = base_shape(tiny_model_dir)
    base = tenant_server.engine.model_name
    with _http(tenant_server, "alice") as alice, _http(tenant_server, "bob") as bob:
        assert upload(alice, "secret", lora_files(shape, seed=1)).status_code == 201
        alice_client, bob_client = _client(tenant_server, "alice"), _client(tenant_server, "bob")
        alice_text = _complete(alice_client, "secret")
        # bob: list, models, get, use (both ways), delete, unload: all as if it did not exist
        assert bob.get("/v1/adapters").json()["data"] == []
        assert "secret" not in {m.id for m in bob_client.models.list().data}
        for resp in (
            bob.get("/v1/adapters/secret"),
            bob.delete("/v1/adapters/secret"),
            bob.post("/v1/unload_lora_adapter", json={"lora_name": "secret"}),
        ):
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "adapter_not_found"
        with pytest.raises(openai.NotFoundError):
            _complete(bob_client, "secret")
        with pytest.raises(openai.NotFoundError) as err:
            _complete(bob_client, base, adapter_id="secret")
        assert "secret" in err.value.body["message"] and "alice" not in err.value.body["message"]
        # bob may use the same id in his own namespace; alice's adapter is untouched
        assert upload(bob, "secret", lora_files(shape, seed=2)).status_code == 201
        assert _complete(bob_client, "secret") != alice_text
        assert _complete(alice_client, "secret") == alice_text
        assert bob.delete("/v1/adapters/secret").status_code == 204
        assert _complete(alice_client, "secret") == alice_text
        assert alice.delete("/v1/adapters/secret").status_code == 204


def test_admin_publishes_an_adapter_to_every_tenant(tenant_server: RunningServer, tiny_model_dir: Path) -> None:
    files = lora_files(base_shape(tiny_model_dir), seed=3)
    with _http(tenant_server, "ops") as ops, _http(tenant_server, "alice") as alice, _http(tenant_server, "bob") as bob:
        refused = upload(alice, "shared", files, public=True)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied"
        resp = upload(ops, "shared", files, public=True)
        assert resp.status_code == 201 and resp.json()["public"] is True
        texts = {_complete(_client(tenant_server, t), "shared") for t in ("alice", "bob", "ops")}
        assert len(texts) == 1
        assert [a["id"] for a in bob.get("/v1/adapters").json()["data"]] == ["shared"]
        assert bob.delete("/v1/adapters/shared").status_code == 403  # visible, but not bob's to delete
        assert ops.delete("/v1/adapters/shared").status_code == 204
        with pytest.raises(openai.NotFoundError):
            _complete(_client(tenant_server, "bob"), "shared")


def test_missing_or_wrong_key_is_401(tenant_server: RunningServer) -> None:
    with _http(tenant_server, None) as anonymous:
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/adapters"), ("POST", "/v1/completions")):
            resp = anonymous.request(method, path, json={"prompt": "x", "max_tokens": 1})
            assert resp.status_code == 401, (method, path)
            assert resp.json()["error"]["code"] == "invalid_api_key"
        wrong = anonymous.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert anonymous.get("/health").status_code == 200 and anonymous.get("/metrics").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=tenant_server.api_url, api_key="nope", max_retries=0).models.list()


def test_one_tenants_flood_meets_429_while_another_gets_in(
    server_factory: ServerFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text("key-alice alice\nkey-bob bob\n")
    server = server_factory(api_keys=keys, max_waiting=4, max_num_seqs=1)
    body = {"prompt": "flood", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    with _http(server, "alice") as alice, _http(server, "bob") as bob, ThreadPoolExecutor(6) as pool:
        flood = [pool.submit(alice.post, "/v1/completions", json=body) for _ in range(6)]
        deadline = time.monotonic() + 30
        # once alice has met a 429, a FIFO queue would be full (4 waiting); fair shares keep room for bob
        while not any(f.done() and f.result().status_code == 429 for f in flood) and time.monotonic() < deadline:
            time.sleep(0.01)
        answer = bob.post("/v1/completions", json={**body, "max_tokens": 2})
        statuses = [f.result().status_code for f in flood]
    assert answer.status_code == 200, answer.text
    assert statuses.count(429) >= 1 and statuses.count(200) >= 2
    refused = next(f.result() for f in flood if f.result().status_code == 429)
    assert refused.headers["Retry-After"] == "1"
