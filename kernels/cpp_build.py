"""Build (or load an earlier build of) a small C++ op library with torch's `load_inline`, once per machine.

The CPU kernels (paged decode attention, the LoRA gather) are C++ sources compiled on first use into
~/.cache/switchboard/torch_extensions/, keyed by a hash of the source, flags, torch version and CPU (the flags
include -march=native), so later processes load them at once. Building needs a C++ compiler and ninja (a pip
dependency). Where a build fails the caller gets the reason as a string and runs its torch path instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Reassociating float sums lets gcc end a dot product with a shuffle tree rather than a chain of scalar adds
# (20-30% faster); the kernels' arithmetic does not depend on the order of their sums.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
LDFLAGS = ["-fopenmp"]  # links libgomp.so.1; torch has loaded its own copy under that name, which is the one used
_STALE_LOCK_S = 600  # a build lock older than this was left by a process killed mid-build


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "switchboard" / "torch_extensions"


def _cpu_id() -> str:
    """The CPU's feature flags (the build uses -march=native), or what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def build_ops(name: str, source: str, cflags: list[str] = CFLAGS, root: Path | None = None) -> str | None:
    """Compile `source` (which registers ops with TORCH_LIBRARY_FRAGMENT) or load an earlier build of it.

    Returns None once its ops are registered under torch.ops, else (after one warning) why not: no compiler,
    no ninja, no setuptools, a compile error, an unwritable cache.
    """
    parts = [source, *cflags, *LDFLAGS, torch.__version__, sys.version, platform.machine(), _cpu_id()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    build_dir = (root or cache_root()) / f"{name}_{key}"
    start = time.perf_counter()
    try:
        from torch.utils import cpp_extension  # imports setuptools

        # pip installs ninja beside this interpreter; a venv's bin is not on PATH when its scripts run directly.
        bin_dir = str(Path(sys.executable).parent)
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        build_dir.mkdir(parents=True, exist_ok=True)
        lock = build_dir / "lock"  # torch's build lock; a process killed mid-build leaves it, and others wait forever
        if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            lock.unlink(missing_ok=True)
        cpp_extension.load_inline(
            name=f"switchboard_{name}_{key}",
            cpp_sources=[source],
            extra_cflags=cflags,
            extra_ldflags=LDFLAGS,
            build_directory=str(build_dir),
            is_python_module=False,
            no_implicit_headers=True,
        )
    except (ImportError, OSError, RuntimeError, subprocess.SubprocessError) as e:
        reason = f"{type(e).__name__}: {e}"[:2000]
        logger.warning("%s: the C++ kernel cannot be built, the torch path runs instead: %s", name, reason)
        return reason
    logger.info("%s: C++ kernel loaded in %.1f s from %s", name, time.perf_counter() - start, build_dir)
    return None
