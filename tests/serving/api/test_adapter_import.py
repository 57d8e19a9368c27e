"""vLLM's `load_lora_adapter`/`unload_lora_adapter` (paths confined to `--import-dir`), `switchboard upload`, and the
adapter metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import openai
import pytest

from switchboard.serving.adapters.metrics import AdapterUsage
from switchboard.serving.cli import main

from .adapter_files import tree_digest
from .conftest import RunningServer, ServerFactory


@pytest.fixture(scope="module")
def import_dir(tmp_path_factory: pytest.TempPathFactory, peft_adapters: dict[str, Path]) -> Path:
    root = tmp_path_factory.mktemp("import")
    shutil.copytree(peft_adapters["lora"], root / "lora")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(peft_adapters["lora"], outside / "lora")
    (root / "escape").symlink_to(outside / "lora", target_is_directory=True)
    (root / "linked-file").mkdir()
    shutil.copy(peft_adapters["lora"] / "adapter_config.json", root / "linked-file")
    (root / "linked-file" / "adapter_model.safetensors").symlink_to(outside / "lora" / "adapter_model.safetensors")
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    (root / "looped-file").mkdir()
    shutil.copy(peft_adapters["lora"] / "adapter_config.json", root / "looped-file")
    (root / "looped-file" / "adapter_model.safetensors").symlink_to(root / "looped-file" / "adapter_model.safetensors")
    return root


@pytest.fixture(scope="module")
def import_server(server_factory: ServerFactory, import_dir: Path, tmp_path_factory) -> RunningServer:
    store = tmp_path_factory.mktemp("store")
    return server_factory(import_dir=import_dir, store=store, metrics_per_adapter=True)


def _text(url: str, model: str) -> str:
    with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60) as c:
        return c.completions.create(model=model, prompt="hi", max_tokens=5, temperature=0).choices[0].text


def test_load_and_unload_lora_adapter(import_server: RunningServer, import_dir: Path) -> None:
    with httpx.Client(base_url=import_server.url, timeout=60) as http:
        resp = http.post("/v1/load_lora_adapter", json={"lora_name": "imported", "lora_path": str(import_dir / "lora")})
        assert resp.status_code == 200 and "imported" in resp.text
        assert http.get("/v1/adapters/imported").json()["kind"] == "lora"
        assert _text(import_server.url, "imported") != _text(import_server.url, import_server.engine.model_name)
        resp = http.post("/v1/unload_lora_adapter", json={"lora_name": "imported"})
        assert resp.status_code == 200
        assert http.get("/v1/adapters/imported").status_code == 404


@pytest.mark.parametrize(
    "path",
    ["{root}/../outside/lora", "{root}/escape", "{root}/linked-file", "/etc", "{root}/lora/../../outside"],
)
def test_paths_outside_the_import_dir_are_refused(import_server: RunningServer, import_dir: Path, path: str) -> None:
    store = import_server.engine.config.store
    before = tree_digest(store)
    with httpx.Client(base_url=import_server.url, timeout=60) as http:
        resp = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path.format(root=import_dir)})
    assert resp.status_code in (403, 404), resp.text
    assert tree_digest(store) == before


@pytest.mark.parametrize(
    ("path", "status", "reason"),
    [
        ("{root}/lo\0ra", 400, "NUL byte"),
        ("{root}/" + "a" * 300, 400, "File name too long"),
        ("{root}/" + "a" * 300 + "/lora", 400, "File name too long"),
        ("{root}/loop-a", 400, "symbolic link"),
        ("{root}/loop-a/lora", 400, "symbolic link"),
        ("{root}/looped-file", 422, "adapter_model.safetensors"),
    ],
)
def test_unusable_paths_are_client_errors(
    import_server: RunningServer, import_dir: Path, path: str, status: int, reason: str
) -> None:
    """A NUL byte, a 300-character name or a symbolic link loop answered 500."""
    store = import_server.engine.config.store
    before = tree_digest(store)
    with httpx.Client(base_url=import_server.url, timeout=60) as http:
        resp = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path.format(root=import_dir)})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and reason in error["message"], error
    assert tree_digest(store) == before


def test_load_lora_adapter_needs_the_import_dir_flag(server_factory: ServerFactory, import_dir: Path) -> None:
    server = server_factory()
    resp = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(import_dir)})
    assert resp.status_code == 403 and "--import-dir" in resp.json()["error"]["message"]


def test_switchboard_upload_cli(
    import_server: RunningServer, peft_adapters: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["upload", str(peft_adapters["ia3"]), "--adapter-id", "cli-ia3", "--url", import_server.url])
    assert done.value.code == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["id"] == "cli-ia3" and answer["kind"] == "ia3"
    assert _text(import_server.url, "cli-ia3")
    with pytest.raises(SystemExit) as again:  # the id exists: the server's 409 is shown and the exit status is 1
        main(["upload", str(peft_adapters["ia3"]), "--adapter-id", "cli-ia3", "--url", import_server.url])
    assert again.value.code == 1 and "adapter_exists" in capsys.readouterr().out


def test_adapter_metrics(import_server: RunningServer, peft_adapters: dict[str, Path]) -> None:
    with httpx.Client(base_url=import_server.url, timeout=60) as http:
        files = {
            n: (n, (peft_adapters["lora-qv"] / n).read_bytes())
            for n in ("adapter_config.json", "adapter_model.safetensors")
        }
        assert http.post("/v1/adapters", data={"adapter_id": "m"}, files=files).status_code == 201
        _text(import_server.url, "m")
        _text(import_server.url, "m")
        text = http.get("/metrics").text
    lines = text.splitlines()
    for needle in (
        'switchboard_adapter_requests_total{adapter="default/m"} 2.0',
        'switchboard_adapter_cache_hits_total{tier="device"}',
        'switchboard_adapter_cache_loads_total{tier="device"}',
        'switchboard_adapter_cache_evictions_total{tier="host"}',
        'switchboard_adapters_resident{tier="host"}',
        'switchboard_adapters_resident{tier="disk"}',
        "switchboard_adapter_store_bytes ",
        "switchboard_adapter_load_seconds_bucket",
        'vllm:lora_requests_info{max_lora="32",running_lora_adapters="",waiting_lora_adapters=""}',
    ):
        assert any(line.startswith(needle) for line in lines), needle


def test_adapter_label_cardinality_is_bounded() -> None:
    usage = AdapterUsage(top_n=2)
    for i, count in enumerate([5, 1, 9, 2, 7]):
        for _ in range(count):
            usage.record(f"a{i}", requests=1, prompt_tokens=3)
    usage.record(None, requests=1)
    families = {f.name: f for f in usage.collect()}
    requests = {s.labels["adapter"]: s.value for s in families["switchboard_adapter_requests"].samples}
    assert requests == {"base": 1, "a2": 9, "a4": 7, "other": 5 + 1 + 2}
