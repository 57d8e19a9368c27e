"""A bounded load test against a real `switchboard serve` (tiny model, 3 adapters): every request accounted for,
results.json valid against its schema, the report and the PNGs written."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import pytest

from switchboard.loadtest.config import Endpoint, LengthSpec, LoadTestConfig, Popularity, PromptFormat
from switchboard.loadtest.main import run
from switchboard.loadtest.report import SCHEMA_PATH

from ..serve_process import ServeProcess

ADAPTERS = ("lora", "ia3", "prefix")


@pytest.fixture(scope="module")
def server_url(
    tiny_model_dir: Path, peft_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`switchboard serve` in its own process, as an operator would run it, in a directory and on an adapter store of
    its own (where the uploads below land)."""
    flags = ["--dtype", "float32", "--max-model-len", "256", "--kv-cache-gb", "0.05", "--num-threads", "1"]
    flags += ["--log-level", "warning"]
    for name in ADAPTERS:
        flags += ["--adapter", f"{name}={peft_adapters[name]}"]
    with ServeProcess(tmp_path_factory.mktemp("server"), tiny_model_dir, *flags) as server:
        yield server.url


def _check_report(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    jsonschema.validate(results, json.loads(SCHEMA_PATH.read_text()))
    assert (out / "results.schema.json").read_text() == SCHEMA_PATH.read_text()
    for png in ("latency_cdf.png", "throughput.png", "adapter_latency.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, png
        assert f"]({png})" in (out / "summary.md").read_text()
    s = results["summary"]
    assert s["sent"] == len(results["requests"]) == s["completed"] + s["errors"]
    assert s["errors"] == sum(s["errors_by_status"].values())
    return results


def test_poisson_zipf_load_over_three_adapters(server_url: str, tmp_path: Path) -> None:
    cfg = LoadTestConfig(
        url=server_url,
        out=tmp_path,
        rate=12.0,
        duration_s=3.0,
        num_requests=200,
        adapters=list(ADAPTERS),
        popularity=Popularity.ZIPF,
        zipf_alpha=1.2,
        prompt_len=LengthSpec(8, 24),
        output_len=LengthSpec(4, 12),
        slo_ttft_ms=10_000,
        slo_tpot_ms=10_000,
        progress=False,
    )
    t0 = time.monotonic()
    results = run(cfg)
    assert time.monotonic() - t0 < 40  # stopped by --duration, then drained
    s = _check_report(tmp_path)["summary"]
    assert s["errors"] == 0 and 15 <= s["sent"] <= 80
    assert {r["adapter"] for r in results["requests"]} <= set(ADAPTERS)
    assert results["per_adapter"][0]["adapter"] == "lora"  # Zipf: the first adapter is the busiest
    for r in results["requests"]:
        assert r["completion_tokens"] == r["max_tokens"]  # ignore_eos, counted from the usage chunk
        assert r["prompt_tokens"] == r["prompt_len"]
        assert r["ttft_ms"] <= r["e2e_ms"] and r["scheduled_s"] is not None
    assert s["output_token_throughput"] > 0 and s["goodput"]["requests"] > 0


def test_closed_loop_counts_errors_by_status(server_url: str, tmp_path: Path) -> None:
    """A fourth id the server does not know: exactly a quarter of the requests come back 404, and are counted."""
    cfg = LoadTestConfig(
        url=server_url,
        out=tmp_path,
        concurrency=4,
        num_requests=16,
        adapters=[*ADAPTERS, "no-such-adapter"],
        popularity=Popularity.DISTINCT,
        prompt_len=LengthSpec(8, 8),
        output_len=LengthSpec(6, 6),
        send_adapter_id=True,
        warmup_requests=4,
        progress=False,
    )
    run(cfg)
    results = _check_report(tmp_path)
    s = results["summary"]
    assert (s["sent"], s["completed"], s["errors"], s["errors_by_status"]) == (16, 12, 4, {"404": 4})
    failed = [r for r in results["requests"] if not r["ok"]]
    assert {r["adapter"] for r in failed} == {"no-such-adapter"} and all(r["status"] == 404 for r in failed)
    assert all(r["scheduled_s"] is None for r in results["requests"])


def test_profile_peer_workload_over_http(server_url: str) -> None:
    """`switchboard profile --peer-url`'s workload: base model and the server's adapters, figures per batch size."""
    from switchboard.bench.profile_report import peer_table
    from switchboard.loadtest.peer import run_peer

    peer = run_peer(server_url, [2], prompt_len=8, max_tokens=5, repeats=2)
    assert set(ADAPTERS) <= set(peer["adapters"])  # discovered from /v1/models
    row = peer["by_batch_size"]["2"]
    for figures in (row["base"], row["adapters"]):
        assert figures["errors"] == 0 and figures["output_tok_s"] > 0 and figures["tpot_p99_ms"] > 0
    ours = {"2": [{"name": "base", "total_tok_s": 100.0}, {"name": "lora-r8-attn", "total_tok_s": 90.0}]}
    table = "\n".join(peer_table(ours, peer))
    assert f"| 2 | 100 | {row['base']['output_tok_s']:.0f} | 90 | {row['adapters']['output_tok_s']:.0f} |" in table


def test_uploaded_adapters_take_the_load(server_url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """--num-adapters 3 --upload-model: three generated LoRA adapters uploaded (POST /v1/adapters), then used."""
    cfg = LoadTestConfig(
        url=server_url,
        out=tmp_path,
        concurrency=3,
        num_requests=9,
        num_adapters=3,
        upload_model=tiny_model_dir,
        popularity=Popularity.DISTINCT,
        prompt_len=LengthSpec(8, 8),
        output_len=LengthSpec(4, 4),
        seed=5,
        progress=False,
    )
    results = run(cfg)
    ids = [f"loadtest-5-{i}" for i in range(3)]
    assert results["server"]["uploaded"] == 3 and results["server"]["adapters"] == ids
    assert results["summary"]["completed"] == 9 and {r["adapter"] for r in results["requests"]} == set(ids)
    listed = {c["id"] for c in httpx.get(f"{server_url}/v1/models").json()["data"]}
    assert set(ids) <= listed


def test_chat_endpoint_with_text_prompts(server_url: str, tmp_path: Path) -> None:
    cfg = LoadTestConfig(
        url=server_url,
        out=tmp_path,
        concurrency=2,
        num_requests=6,
        adapters=["lora", "prefix"],
        endpoint=Endpoint.CHAT,
        prompt_format=PromptFormat.TEXT,
        prompt_len=LengthSpec(4, 12),
        output_len=LengthSpec(6, 6),
        progress=False,
    )
    results = run(cfg)
    _check_report(tmp_path)
    assert results["summary"]["completed"] == 6
    for r in results["requests"]:
        assert r["completion_tokens"] == 6 and r["prompt_tokens"] > r["prompt_len"]  # words + the chat template
        assert r["num_chunks"] >= 1 and r["ttft_ms"] > 0


def test_compare_runs_side_by_side(server_url: str, tmp_path: Path) -> None:
    dirs = []
    for i, adapter in enumerate(("lora", "ia3", "ia3")):
        dirs.append(tmp_path / f"run{i}")
        run(
            LoadTestConfig(
                url=server_url,
                out=dirs[-1],
                concurrency=2,
                num_requests=4,
                adapters=[adapter],
                prompt_len=LengthSpec(8, 8),
                output_len=LengthSpec(4, 4),
                progress=False,
            )
        )
    from switchboard.loadtest.compare import main as compare

    compare([f"lora={dirs[0]}", f"ia3={dirs[1]}", f"ia3={dirs[2]}", "--out", str(tmp_path / "cmp")])
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| lora | 1 |" in md and "| ia3 | 2 |" in md and "lora / ia3:" in md
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000


def test_a_server_started_with_relative_paths_finds_its_model(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server runs in its work directory; bench-replicas passed `.cache/demo-model` and the server found no
    config.json there."""
    (tmp_path / "model").symlink_to(tiny_model_dir)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path)
    with ServeProcess(Path("work"), Path("model"), "--log-level", "warning") as server:
        assert server.store == tmp_path / "work" / "store"
        models = httpx.get(f"{server.url}/v1/models").json()["data"]
        assert [m["id"] for m in models] == [tiny_model_dir.name]  # the server names it by the resolved directory
