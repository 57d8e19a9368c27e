"""A server killed while it compiles its C++ kernels does not block the next start: `switchboard serve` as a user
starts it, with its kernel cache under tmp_path, killed with `kill -9` midway through the first build."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ..serve_process import child_pids, free_port


def _serve(model_dir: Path, cache: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """`switchboard serve` in a process group of its own, logging to `log`; returns it and its port."""
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("switchboard")), "serve", "--model", str(model_dir)]
    cmd += ["--port", str(port), "--dtype", "float32", "--num-kv-blocks", "64", "--log-level", "warning"]
    cmd += ["--store", str(log.parent / "store")]
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=log.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "XDG_CACHE_HOME": str(cache)},
            start_new_session=True,
        )
    return proc, port


def _processes_in(directory: Path) -> list[int]:
    """Pids of the processes whose working directory is under `directory` (compile children, ninja, compilers)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")).is_relative_to(directory):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _wait_for(condition, timeout_s: float, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None, f"the server exited before {what}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s:\n{log.read_text()}"
        time.sleep(0.1)


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.slow
def test_a_server_killed_mid_build_does_not_block_the_next_start(tiny_model_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    builds = cache / "switchboard" / "torch_extensions"
    first, _ = _serve(tiny_model_dir, cache, tmp_path / "first.log")
    try:
        # torch's lock and the compiler's processes: a compile under way, as a killed one leaves it
        _wait_for(
            lambda: any(builds.glob("*/lock")) and _processes_in(builds),
            90,
            "compile under way",
            first,
            tmp_path / "first.log",
        )
        time.sleep(1)
        server = {first.pid, *child_pids(first.pid)}  # the server and its engine core, which builds the kernels
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    [stale] = [p.parent for p in builds.glob("*/lock")]
    builder = int((stale / "build.lock").read_text().split()[0])
    assert builder in server, (builder, server)
    deadline = time.monotonic() + 5  # the compile died with the server (it was in a session of its own)
    while _processes_in(builds):
        assert time.monotonic() < deadline, f"left compiling: {_processes_in(builds)}"
        time.sleep(0.1)

    log = tmp_path / "second.log"
    second, port = _serve(tiny_model_dir, cache, log)
    try:
        _wait_for(lambda: _healthy(port), 60, "200 from /health", second, log)
    finally:
        second.terminate()
        second.wait(timeout=30)
    text = log.read_text()
    assert f"was left by pid {builder}" in text and f"removing {stale / 'lock'}" in text, text
    assert "the torch path runs instead" not in text, text
