"""`/metrics` names no tenant's adapter unless `--metrics-per-adapter` asks for it, and with `--api-keys` only an
admin key reads it (issue 14: `switchboard_adapter_requests_total{adapter="bob/bobs-secret"}` was public)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .adapter_files import base_shape, lora_files, upload
from .conftest import RunningServer, ServerFactory

KEYS = "key-alice alice\nkey-bob bob\nkey-ops ops admin\n"


def _server(server_factory: ServerFactory, tmp_path_factory: pytest.TempPathFactory, **flags: object) -> RunningServer:
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(KEYS)
    return server_factory(api_keys=keys, **flags)


def _bob_uses_his_secret(server: RunningServer, tiny_model_dir: Path) -> None:
    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": "Bearer key-bob"}) as bob:
        assert upload(bob, "bobs-secret", lora_files(base_shape(tiny_model_dir))).status_code == 201
        body = {"model": "bobs-secret", "prompt": "hi", "max_tokens": 2, "temperature": 0}
        assert bob.post("/v1/completions", json=body).status_code == 200


def _scrape(server: RunningServer, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{server.url}/metrics", headers=headers, timeout=30)


def _samples(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The exposition parsed as Prometheus does: {(sample name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


def test_metrics_need_an_admin_key_and_name_no_adapter_by_default(
    server_factory: ServerFactory, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> None:
    server = _server(server_factory, tmp_path_factory)
    _bob_uses_his_secret(server, tiny_model_dir)
    for key, status, code in (
        (None, 401, "invalid_api_key"),
        ("nope", 401, "invalid_api_key"),
        ("key-alice", 403, "permission_denied"),
    ):
        resp = _scrape(server, key)
        assert resp.status_code == status, resp.text
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    resp = _scrape(server, "key-ops")
    assert resp.status_code == 200
    assert "bobs-secret" not in resp.text and "bob/" not in resp.text
    samples = _samples(resp.text)
    assert samples[("switchboard_adapter_requests_total", (("adapter", "other"),))] == 1
    assert samples[("switchboard_generation_tokens_total", ())] >= 1  # the aggregate series stay
    assert not any(name.startswith("vllm:lora_requests_info") for name, _ in samples)


def test_metrics_per_adapter_names_adapters_to_the_admin(
    server_factory: ServerFactory, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> None:
    server = _server(server_factory, tmp_path_factory, metrics_per_adapter=True)
    _bob_uses_his_secret(server, tiny_model_dir)
    assert _scrape(server, "key-bob").status_code == 403
    samples = _samples(_scrape(server, "key-ops").text)
    assert samples[("switchboard_adapter_requests_total", (("adapter", "bob/bobs-secret"),))] == 1
    assert any(name == "vllm:lora_requests_info" for name, _ in samples)


def test_an_open_server_serves_metrics_without_a_key(server: RunningServer) -> None:
    resp = _scrape(server, None)
    assert resp.status_code == 200 and "switchboard_requests_total" in resp.text
