"""The console script end to end: `switchboard serve` as a user starts it, on a free port, in a directory and on an
adapter store of the test's (an adapter a user uploaded to the default store is not seen)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ..serve_process import ServeProcess


def test_serve_command_answers_openai_requests(tiny_model_dir: Path, tmp_path: Path) -> None:
    flags = ["--dtype", "float32", "--served-model-name", "tiny", "--num-kv-blocks", "64", "--log-level", "warning"]
    with ServeProcess(tmp_path, tiny_model_dir, *flags) as server:
        models = httpx.get(f"{server.url}/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        out = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).json()
        assert out["usage"]["completion_tokens"] == 5 and out["model"] == "tiny"
        exposition = httpx.get(f"{server.url}/metrics").text
        assert "switchboard_kv_cache_blocks_total 64.0" in exposition
        assert "switchboard_num_preemptions_total 0.0" in exposition


def test_unsupported_model_directory_fails_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    script = Path(sys.executable).with_name("switchboard")
    cmd = [str(script), "serve", "--model", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 2
    assert "unsupported architecture GPT2LMHeadModel" in res.stderr and "llama, mistral, qwen2" in res.stderr


@pytest.mark.parametrize("flag", ["--max-num-seqs=0", "--block-size=0", "--replicas=0"])
def test_invalid_flags_are_refused(tiny_model_dir: Path, tmp_path: Path, flag: str) -> None:
    script = Path(sys.executable).with_name("switchboard")
    cmd = [str(script), "serve", "--model", str(tiny_model_dir), flag]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 2 and "must be at least 1" in res.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tensor-parallel-size", "2"], "need --backend vllm"),
        (["--distributed-executor-backend", "ray"], "need --backend vllm"),
        (["--backend", "vllm", "--quantize", "nf4"], "not available with --backend vllm"),
        (["--backend", "vllm", "--tensor-parallel-size", "0"], "must be at least 1"),
    ],
)
def test_backend_flags_are_checked_before_anything_loads(
    tiny_model_dir: Path, tmp_path: Path, flags: list[str], message: str
) -> None:
    script = Path(sys.executable).with_name("switchboard")
    cmd = [str(script), "serve", "--model", str(tiny_model_dir), *flags]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 2 and message in res.stderr, res.stderr


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_backend_vllm_without_vllm_says_how_to_install_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("switchboard")
    cmd = [str(script), "serve", "--model", str(tiny_model_dir), "--backend", "vllm"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 2 and "pip install 'switchboard[vllm]'" in res.stderr, res.stderr
