"""Kernel builds never hang: a lock left by a killed builder is taken over, a live builder past the timeout is not
waited for, a compile past the timeout is stopped with its compiler. Real processes, real compiles, under tmp_path."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from switchboard.kernels import cpp_build
from switchboard.kernels.build_lock import read_holder

# Takes the build lock as a builder does, leaves torch's lock as a compile under way does, and sleeps.
HOLD = """
import sys, time
from pathlib import Path
from switchboard.kernels.build_lock import build_lock
build_dir = Path(sys.argv[1])
build_dir.mkdir(parents=True, exist_ok=True)
with build_lock(build_dir / "build.lock", timeout_s=60):
    (build_dir / "lock").touch()
    print("held", flush=True)
    time.sleep(600)
"""


def _source(namespace: str) -> str:
    """A one-op library, under a namespace of its own (a process registers each namespace's ops once)."""
    return f"""
#include <ATen/core/Tensor.h>
#include <torch/library.h>
static at::Tensor twice(const at::Tensor& x) {{ return x.mul(2); }}
TORCH_LIBRARY_FRAGMENT({namespace}, m) {{ m.def("twice(Tensor x) -> Tensor", twice); }}
"""


def _build_dir(name: str, source: str, root: Path) -> Path:
    return Path(cpp_build.compile_job(name, source, [], root).build_dir)


def _hold(build_dir: Path) -> subprocess.Popen[str]:
    """A live process holding `build_dir`'s build lock."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(build_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


def _processes_in(directory: Path) -> list[int]:
    """Pids of the processes whose working directory is `directory` (the compile child, ninja, the compiler)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == directory:
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


@pytest.mark.slow
def test_a_lock_left_by_a_killed_builder_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = _source("sb_test_takeover")
    build_dir = _build_dir("takeover", source, tmp_path)
    holder = _hold(build_dir)
    holder.kill()
    holder.wait()
    assert (build_dir / "lock").exists() and read_holder(build_dir / "build.lock").pid == holder.pid

    with caplog.at_level(logging.INFO):
        assert cpp_build.build_ops("takeover", source, [], tmp_path) is None
    warnings = _messages(caplog, logging.WARNING)
    assert any(f"left by pid {holder.pid}" in m and "taking it over" in m for m in warnings), warnings
    assert any(f"removing {build_dir / 'lock'}" in m for m in warnings), warnings
    assert any(m.startswith(f"building takeover in {build_dir}") for m in _messages(caplog, logging.INFO))
    assert torch.ops.sb_test_takeover.twice(torch.ones(2)).tolist() == [2.0, 2.0]
    assert not (build_dir / "lock").exists() and read_holder(build_dir / "build.lock") is None

    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert cpp_build.build_ops("takeover", source, [], tmp_path) is None  # the next start: no compile
    assert _messages(caplog, logging.INFO) == [f"takeover: C++ kernel loaded from cache {build_dir}"]


BUILD = """
import sys
from pathlib import Path
from switchboard.kernels.cpp_build import build_ops
assert build_ops(sys.argv[1], sys.argv[2], [], Path(sys.argv[3])) is None
"""


@pytest.mark.slow
def test_a_waiter_loads_what_the_holder_built(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = _source("sb_test_shared")
    build_dir = _build_dir("shared", source, tmp_path)
    builder = subprocess.Popen([sys.executable, "-c", BUILD, "shared", source, str(tmp_path)])
    deadline = time.monotonic() + 30
    while read_holder(build_dir / "build.lock") is None:
        assert builder.poll() is None and time.monotonic() < deadline, "the builder never took the lock"
        time.sleep(0.05)
    with caplog.at_level(logging.INFO):
        assert cpp_build.build_ops("shared", source, [], tmp_path) is None
    assert builder.wait(timeout=30) == 0
    assert any(f"waiting for pid {builder.pid}" in m for m in _messages(caplog, logging.INFO))
    assert f"shared: C++ kernel built by another process in {build_dir}" in _messages(caplog, logging.INFO)
    assert not any(m.startswith("building shared") for m in _messages(caplog, logging.INFO))  # compiled once
    assert torch.ops.sb_test_shared.twice(torch.ones(1)).tolist() == [2.0]


def test_a_live_holder_past_the_timeout_is_not_waited_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cpp_build.TIMEOUT_ENV, "2")
    source = _source("sb_test_held")
    holder = _hold(_build_dir("held", source, tmp_path))
    try:
        start = time.monotonic()
        with caplog.at_level(logging.INFO):
            reason = cpp_build.build_ops("held", source, [], tmp_path)
        waited_s = time.monotonic() - start
    finally:
        holder.kill()
        holder.wait()
    assert isinstance(reason, str) and reason.startswith(f"BuildLockTimeout: pid {holder.pid} has held"), reason
    assert waited_s < 2 + 3  # it gives up once the holder is 2 s in (it took the lock before we began to wait)
    assert any(f"waiting for pid {holder.pid}" in m for m in _messages(caplog, logging.INFO))
    assert _messages(caplog, logging.WARNING) == [
        f"held: the C++ kernel cannot be built, the torch path runs instead: {reason}"
    ]


# A C++ compiler that hangs on every compile (after saying so), and does everything else as c++ does.
STALLING_CXX = """#!/bin/sh
case " $* " in *" -c "*) touch compiling; exec sleep 600;; esac
exec c++ "$@"
"""


@pytest.mark.slow
def test_a_compile_past_the_timeout_is_stopped_with_its_compiler(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cxx = tmp_path / "stalling-c++"
    cxx.write_text(STALLING_CXX)
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    source = _source("sb_test_stuck")
    build_dir = _build_dir("stuck", source, tmp_path)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        reason = cpp_build.build_ops("stuck", source, [], tmp_path, timeout_s=8)
    assert time.monotonic() - start < 8 + 3
    assert reason == "CompileError: the compile ran past its timeout of 8 s and was stopped"
    assert len(caplog.records) == 1
    assert (build_dir / "compiling").exists()  # the child got as far as the compiler
    deadline = time.monotonic() + 5
    while _processes_in(build_dir):
        assert time.monotonic() < deadline, f"left running: {_processes_in(build_dir)}"
        time.sleep(0.1)
    assert not (build_dir / "lock").exists() and read_holder(build_dir / "build.lock") is None


def test_cpu_flags_are_proc_cpuinfos_names() -> None:
    flags = cpp_build.cpu_flags()
    assert all(flag and " " not in flag and ":" not in flag for flag in flags)
    if Path("/proc/cpuinfo").exists() and platform.machine() in ("x86_64", "AMD64"):
        assert {"sse2", "fpu"} <= flags
