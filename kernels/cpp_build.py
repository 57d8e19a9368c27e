"""Build (or load an earlier build of) a small C++ op library, once per machine, never holding up the server.

The CPU kernels (paged decode attention, the LoRA gather) are C++ sources in kernels/csrc/ (package data, read with
`read_source`; the headers there are copied beside each build's source), compiled on first use into
~/.cache/switchboard/torch_extensions/, keyed by a hash of the source, headers, flags, torch version and CPU (the flags
include -march=native), so later processes load them at once. Building needs a C++ compiler and ninja (a pip
dependency). Where a build fails or times out the caller gets the reason as a string and runs its torch path instead.

A build holds `build_lock` (released by the OS if the builder dies, so a killed server never blocks the next one)
and compiles in a child process that a timeout stops (`cpp_compile`); the library is then loaded here.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path

import torch

from switchboard.kernels.build_lock import build_lock
from switchboard.kernels.cpp_compile import DONE, CompileJob, compile_in_child

logger = logging.getLogger(__name__)

# Reassociating float sums lets gcc end a dot product with a shuffle tree rather than a chain of scalar adds
# (20-30% faster); the kernels' arithmetic does not depend on the order of their sums.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
LDFLAGS = ["-fopenmp"]  # links libgomp.so.1; torch has loaded its own copy under that name, which is the one used
BUILD_TIMEOUT_S = 300.0  # a build (or a wait for another process's) past this is given up; env overrides it
TIMEOUT_ENV = "SWITCHBOARD_KERNEL_BUILD_TIMEOUT_S"
CSRC = "switchboard.kernels.csrc"  # the package holding the C++ sources
TYPICAL_BUILD_S = 15  # what the start-up log promises for a first build (one kernel, two busy cores)


def read_source(name: str) -> str:
    """The C++ source kernels/csrc/<name>.cpp, as installed with the package."""
    return files(CSRC).joinpath(f"{name}.cpp").read_text(encoding="utf-8")


def shared_headers() -> dict[str, str]:
    """kernels/csrc/*.h by file name: what a source may `#include "..."` (copied beside it in its build)."""
    return {f.name: f.read_text(encoding="utf-8") for f in files(CSRC).iterdir() if f.name.endswith(".h")}


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "switchboard" / "torch_extensions"


def build_timeout_s() -> float:
    """$SWITCHBOARD_KERNEL_BUILD_TIMEOUT_S where set to a positive number of seconds, else BUILD_TIMEOUT_S."""
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return BUILD_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if seconds > 0:
        return seconds
    logger.warning("%s=%r is not a positive number of seconds; using %g", TIMEOUT_ENV, value, BUILD_TIMEOUT_S)
    return BUILD_TIMEOUT_S


def _cpu_id() -> str:
    """The CPU's feature flags (the build uses -march=native), or what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where it is not Linux); read once."""
    line = _cpu_id()
    return frozenset(line.partition(":")[2].split()) if ":" in line else frozenset()


def compile_job(
    name: str,
    source: str,
    cflags: list[str] = CFLAGS,
    root: Path | None = None,
    headers: Mapping[str, str] | None = None,
) -> CompileJob:
    """The build of `source` with `headers` (default `shared_headers()`), in a directory of `root` (default
    `cache_root()`) named by `name` and a hash of all the build depends on."""
    headers = dict(shared_headers() if headers is None else headers)
    header_parts = [part for item in sorted(headers.items()) for part in item]
    parts = [source, *header_parts, *cflags, *LDFLAGS, torch.__version__, sys.version, platform.machine(), _cpu_id()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    build_dir = (root or cache_root()) / f"{name}_{key}"
    return CompileJob(f"switchboard_{name}_{key}", source, cflags, LDFLAGS, str(build_dir), headers)


def build_ops(
    name: str,
    source: str,
    cflags: list[str] = CFLAGS,
    root: Path | None = None,
    timeout_s: float | None = None,
    headers: Mapping[str, str] | None = None,
) -> str | None:
    """Compile `source` (which registers ops with TORCH_LIBRARY_FRAGMENT; it may include `headers`, by default
    `shared_headers()`) or load an earlier build of it.

    Returns None once its ops are registered under torch.ops, else (after one warning) why not: no compiler,
    no ninja, no setuptools, a compile error, an unwritable cache, a build (ours or another process's) past
    `timeout_s` (default `build_timeout_s()`).
    """
    job = compile_job(name, source, cflags, root, headers)
    build_dir = Path(job.build_dir)
    try:
        if (build_dir / DONE).exists():
            logger.info("%s: C++ kernel loaded from cache %s", name, build_dir)
        else:
            _build(name, job, timeout_s if timeout_s is not None else build_timeout_s())
        torch.ops.load_library(build_dir / f"{job.module}.so")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:  # BuildLockTimeout is an OSError
        reason = f"{type(e).__name__}: {e}"[:2000]
        logger.warning("%s: the C++ kernel cannot be built, the torch path runs instead: %s", name, reason)
        return reason
    return None


def _build(name: str, job: CompileJob, timeout_s: float) -> None:
    """Compile `job` under the build lock, unless the process we waited for has built it."""
    build_dir = Path(job.build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    with build_lock(build_dir / "build.lock", timeout_s) as lock_fd:
        if (build_dir / DONE).exists():
            logger.info("%s: C++ kernel built by another process in %s", name, build_dir)
            return
        torch_lock = build_dir / "lock"  # torch's; every builder holds ours first, so one here is stale
        if torch_lock.exists():
            logger.warning("%s: removing %s, left by a build that was killed", name, torch_lock)
            torch_lock.unlink(missing_ok=True)
        logger.info("building %s in %s (first start on this machine, ~%d s)", name, build_dir, TYPICAL_BUILD_S)
        start = time.perf_counter()
        try:
            compile_in_child(job, timeout_s, keep_fds=(lock_fd,))
        finally:
            torch_lock.unlink(missing_ok=True)  # the child, stopped at the timeout, may have left it
        logger.info("%s: C++ kernel built in %.1f s", name, time.perf_counter() - start)
