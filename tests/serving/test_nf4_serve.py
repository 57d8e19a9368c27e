"""`switchboard serve --quantize nf4` as a user starts it: the start-up line reports the base's weight memory,
/metrics exports it, and an adapter answers through the openai client on the NF4 base."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nf4_server_reports_base_weight_memory(
    tiny_model_dir: Path, peft_adapters: dict[str, Path], tmp_path: Path
) -> None:
    port = _free_port()
    script = Path(sys.executable).with_name("switchboard")
    cmd = [str(script), "serve", "--model", str(tiny_model_dir), "--port", str(port), "--dtype", "float32"]
    cmd += ["--quantize", "nf4", "--served-model-name", "tiny", "--num-kv-blocks", "64", "--log-level", "warning"]
    cmd += ["--adapter", f"ia3={peft_adapters['ia3']}", "--store", str(tmp_path / "store")]
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, log_path.read_text()
                try:
                    if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
            out = client.completions.create(model="ia3", prompt="hello", max_tokens=4, temperature=0)
            assert out.model == "ia3" and out.usage.completion_tokens == 4
            exposition = httpx.get(f"{base}/metrics").text
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    started = re.search(r"base weights ([\d.]+) MiB \(linears ([\d.]+) MiB NF4", log_path.read_text())
    assert started, log_path.read_text()
    gauge = re.search(r'switchboard_base_weight_bytes\{component="linear",quantize="nf4"\} ([\d.e+]+)', exposition)
    assert gauge, exposition
    linear_bytes = float(gauge.group(1))
    assert abs(linear_bytes / 2**20 - float(started.group(2))) < 0.05
    assert 'switchboard_base_weight_bytes{component="total",quantize="nf4"}' in exposition
