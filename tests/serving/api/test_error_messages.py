"""The error messages issue 19 (item 4) found misleading, each as a user meets it: through the real server, the
console script's `main`, or the load tester's report."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from switchboard.loadtest.report import goodput_line
from switchboard.serving.api.errors import ApiError
from switchboard.serving.api.resolve import resolve_model
from switchboard.serving.cli import main

from .conftest import RunningServer, ServerFactory


@pytest.fixture(scope="module")
def two_adapters(server_factory: ServerFactory, peft_adapters: dict[str, Path]) -> RunningServer:
    return server_factory(adapters={"demo-lora": peft_adapters["lora"], "demo-ia3": peft_adapters["ia3"]})


def _post(server: RunningServer, **body: object) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1, **body}, timeout=60)


def test_model_and_adapter_id_naming_two_adapters_is_a_conflict(two_adapters: RunningServer) -> None:
    resp = _post(two_adapters, model="demo-lora", adapter_id="demo-ia3")
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "adapter_conflict" and error["param"] == "adapter_id"
    assert "`demo-lora`" in error["message"] and "`demo-ia3`" in error["message"]
    assert "does not exist" not in error["message"]
    # Either one alone, or both the same, still works; an unknown model is still 404.
    assert _post(two_adapters, model="demo-lora", adapter_id="demo-lora").status_code == 200
    assert _post(two_adapters, model="nothing", adapter_id="demo-ia3").json()["error"]["code"] == "model_not_found"


def test_empty_adapter_id_says_it_is_empty(two_adapters: RunningServer) -> None:
    resp = _post(two_adapters, adapter_id="")
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "adapter_id" and "`adapter_id` is empty" in error["message"]
    assert "``" not in error["message"]


def test_resolve_rules_for_the_conflict() -> None:
    known = {"a", "b"}.__contains__
    with pytest.raises(ApiError) as info:
        resolve_model("a", "b", base_model="base", adapter_exists=known)
    assert (info.value.status, info.value.code) == (400, "adapter_conflict")
    with pytest.raises(ApiError) as info:
        resolve_model(None, "", base_model="base", adapter_exists=known)
    assert (info.value.status, info.value.param) == (400, "adapter_id")


def test_adapter_flag_naming_a_missing_directory(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["serve", "--model", str(tiny_model_dir), "--adapter", "foo=/nonexistent"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "--adapter foo=/nonexistent: /nonexistent does not exist" in err and "Traceback" not in err


def test_adapter_flag_naming_a_directory_without_an_adapter(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--adapter", f"foo={tmp_path}"])
    assert done.value.code == 2
    assert f"--adapter foo={tmp_path}: adapter_config.json: missing" in capsys.readouterr().err


def test_upload_takes_the_openai_base_url(
    two_adapters: RunningServer, peft_adapters: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["upload", str(peft_adapters["lora-qv"]), "--adapter-id", "via-v1", "--url", f"{two_adapters.url}/v1/"])
    assert done.value.code == 0, capsys.readouterr()
    assert _post(two_adapters, model="via-v1").status_code == 200


def test_upload_to_a_server_that_is_down(peft_adapters: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(SystemExit) as done:
        main(["upload", str(peft_adapters["lora-qv"]), "--adapter-id", "x", "--url", url])
    assert done.value.code == 1
    err = capsys.readouterr().err
    assert f"cannot reach {url}/v1/adapters" in err and "is the server running?" in err and "Traceback" not in err


def test_goodput_line_names_only_the_slo_set() -> None:
    none = {"requests": 3, "fraction": 1.0, "slo_ttft_ms": None, "slo_tpot_ms": None}
    assert "<= -" not in goodput_line(none, 3) and "no SLO was set" in goodput_line(none, 3)
    ttft = {**none, "slo_ttft_ms": 500.0, "requests": 2, "fraction": 2 / 3}
    assert goodput_line(ttft, 3) == "Goodput: 2 of 3 requests (67%) met the SLO (TTFT <= 500.0 ms)."
    both = {**ttft, "slo_tpot_ms": 50.0}
    assert goodput_line(both, 3).endswith("(TTFT <= 500.0 ms, TPOT <= 50.0 ms).")
