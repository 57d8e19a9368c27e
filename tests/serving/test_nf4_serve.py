"""`switchboard serve --quantize nf4` as a user starts it: the start-up line reports the base's weight memory,
/metrics exports it, and an adapter answers through the openai client on the NF4 base."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import openai

from ..serve_process import ServeProcess


def test_nf4_server_reports_base_weight_memory(
    tiny_model_dir: Path, peft_adapters: dict[str, Path], tmp_path: Path
) -> None:
    flags = ["--dtype", "float32", "--quantize", "nf4", "--served-model-name", "tiny", "--num-kv-blocks", "64"]
    flags += ["--log-level", "warning", "--adapter", f"ia3={peft_adapters['ia3']}"]
    with ServeProcess(tmp_path, tiny_model_dir, *flags) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        out = client.completions.create(model="ia3", prompt="hello", max_tokens=4, temperature=0)
        assert out.model == "ia3" and out.usage.completion_tokens == 4
        exposition = httpx.get(f"{server.url}/metrics").text
    log = server.log.read_text()
    started = re.search(r"base weights ([\d.]+) MiB \(linears ([\d.]+) MiB NF4", log)
    assert started, log
    gauge = re.search(r'switchboard_base_weight_bytes\{component="linear",quantize="nf4"\} ([\d.e+]+)', exposition)
    assert gauge, exposition
    linear_bytes = float(gauge.group(1))
    assert abs(linear_bytes / 2**20 - float(started.group(2))) < 0.05
    assert 'switchboard_base_weight_bytes{component="total",quantize="nf4"}' in exposition
