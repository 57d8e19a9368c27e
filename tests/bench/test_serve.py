"""`switchboard bench-serve` and the served-path profiler end to end on the tiny model: a real server, the real
client, a table with ratios and targets, JSON and PNG; vLLM's rows are skipped, saying so, without its venv."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from switchboard.bench.serve_profile import ENGINE_RULES, LOOP_RULES, classify

pytestmark = pytest.mark.slow

SMALL_W = ["--num-requests", "4", "--prompt-len", "8", "--max-tokens", "4", "--num-loras", "2", "--dtype", "float32"]


def test_bench_serve_prints_the_table_and_writes_json_and_png(tiny_model_dir: Path, tmp_path: Path) -> None:
    cmd = [str(Path(sys.executable).with_name("switchboard")), "bench-serve", "--model", str(tiny_model_dir)]
    cmd += [*SMALL_W, "--rounds", "2", "--vllm-venv", str(tmp_path / "no-venv"), "--out", str(tmp_path / "out")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "no vLLM venv" in res.stdout
    report = json.loads((tmp_path / "out/serve.json").read_text())
    names = list(report["configs"])
    assert names == [
        "ours in process",
        "ours over HTTP, base model",
        "ours over HTTP, 2 distinct LoRA r=8",
        "ours over HTTP, base model, engine core process (--engine-process on)",
    ]
    for name in names:
        runs = report["runs"][name]
        assert len(runs) == 2 and all(r["tokens"] == 4 * 4 for r in runs)  # EOS ignored: every token generated
        assert report["configs"][name]["tok_s_median"] > 0
    assert report["configs"][names[1]]["tpot_p99_ms"] > 0
    met = {t["target"]: t["met"] for t in report["targets"]}
    assert met["base model over HTTP >= 1.2x vLLM-CPU with LoRA disabled"] is None  # not measured, not invented
    assert isinstance(met["over HTTP >= 0.95x our own in-process throughput"], bool)
    assert "| ours over HTTP, base model |" in res.stdout and "| target | measured | met |" in res.stdout
    assert (tmp_path / "out/serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_serve_profile_attributes_the_engine_threads_time(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    cmd = [sys.executable, "-m", "switchboard.bench.serve_profile", "--model", str(tiny_model_dir), *SMALL_W]
    # 32 new tokens over 6 rounds: the engine busy for about a second, some 200 samples (with 4 tokens over 3 rounds
    # the tiny model's runs took 0.1-0.4 s, mostly idle, and the forward or the adapter ops went unsampled at times)
    cmd += ["--max-tokens", "32", "--rounds", "6", "--rate", "200", "--no-torch", "--engine-process", "on"]
    cmd += ["--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    http = json.loads(out.read_text())["http"]
    assert set(http) == {"base", "2 LoRA"}
    assert all(r["engine_process"] for r in http.values())  # the engine's loop sampled in the core process
    for r in http.values():
        assert abs(sum(r["engine"].values()) - 1) < 1e-6 and abs(sum(r["event_loop"].values()) - 1) < 1e-6
        assert r["engine_thread_s"] > 0
        assert any(k.startswith("forward") for k in r["engine"]), r  # the model ran while sampled
    assert "adapter ops (LoRA shrink/expand)" in http["2 LoRA"]["engine"]
    assert "| engine thread | share of wall | ms per step |" in res.stdout


def test_classify_orders_its_rules() -> None:
    step = "LLMEngine.step (engine/llm_engine.py:336);ModelRunner.run (engine/model_runner.py:101)"
    forward = f"{step};LlamaModel.forward (models/llama.py:127);AdapterLinear.forward (models/linear.py:66)"
    assert classify(forward, ENGINE_RULES) == "forward: linear products"
    assert classify(f"{forward};AdapterBatch.add_output (engine/adapter_batch.py:50)", ENGINE_RULES).startswith(
        "adapter"
    )
    assert classify(f"{forward};at::native::linear (libtorch_cpu.so);take_gil (libpython3.11.so)", ENGINE_RULES) == (
        "GIL wait"
    )
    assert classify(f"{step};sample (engine/sampler.py:40)", ENGINE_RULES) == "sampling"
    idle = "_run (engine/async_engine.py:224);_queue_SimpleQueue_get (_queuemodule.c.h:177);0x7efc10ca3f16 (libc.so.6)"
    assert classify(idle, ENGINE_RULES).startswith("idle")
    # uvloop's loop (uvicorn's default): every stack starts in uvicorn's run(); waiting is epoll_pwait under libuv
    loop = "run (uvicorn/main.py:643);run_forever (loop.c:33192);uv_run (core.c:464);uv__io_poll (linux.c:1452)"
    assert classify(f"{loop};epoll_pwait (libc.so.6)", LOOP_RULES).startswith("idle")
    http = f"{loop};uv__read (stream.c:1143);data_received (uvicorn/protocols/http/httptools_impl.py:120)"
    assert classify(http, LOOP_RULES).startswith("HTTP")
    assert classify(f"{loop};uv__run_timers (timer.c:185)", LOOP_RULES).startswith("event loop scheduling")
    # CPython 3.11 waits for the GIL in a condition variable called from the interpreter; torch's waits are its own
    gil = f"{step};guard (engine/isolation.py:33);pthread_cond_wait (libc.so.6);0x7efc10ca3f16 (libc.so.6)"
    assert classify(gil, ENGINE_RULES) == "GIL wait"
    omp = f"{forward};c10::ThreadPool::main_loop (libc10.so);pthread_cond_wait (libc.so.6)"
    assert classify(omp, ENGINE_RULES) == "forward: linear products"
