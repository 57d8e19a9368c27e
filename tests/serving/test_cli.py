"""The console script end to end: `switchboard serve` as a user starts it, on a free port of 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_answers_openai_requests(tiny_model_dir: Path, tmp_path: Path) -> None:
    port = _free_port()
    script = Path(sys.executable).with_name("switchboard")
    cmd = [
        str(script),
        "serve",
        "--model",
        str(tiny_model_dir),
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--served-model-name",
        "tiny",
        "--num-kv-blocks",
        "64",
        "--log-level",
        "warning",
    ]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        models = httpx.get(f"{base}/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        out = httpx.post(f"{base}/v1/completions", json=body, timeout=30).json()
        assert out["usage"]["completion_tokens"] == 5 and out["model"] == "tiny"
        exposition = httpx.get(f"{base}/metrics").text
        assert "switchboard_kv_cache_blocks_total 64.0" in exposition
        assert "switchboard_num_preemptions_total 0.0" in exposition
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_unsupported_model_directory_fails_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    script = Path(sys.executable).with_name("switchboard")
    res = subprocess.run([str(script), "serve", "--model", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "unsupported architecture GPT2LMHeadModel" in res.stderr and "llama, mistral, qwen2" in res.stderr


@pytest.mark.parametrize("flag", ["--max-num-seqs=0", "--block-size=0"])
def test_invalid_flags_are_refused(tiny_model_dir: Path, flag: str) -> None:
    script = Path(sys.executable).with_name("switchboard")
    res = subprocess.run(
        [str(script), "serve", "--model", str(tiny_model_dir), flag], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2 and "must be at least 1" in res.stderr
