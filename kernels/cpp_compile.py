"""Compile a C++ op library in a child process, so that a timeout can stop it (with its ninja and compiler).

torch's `load_inline` runs ninja with no timeout: a compiler that hangs, or a machine so loaded that a build takes
many minutes, would hold up the server's start. `compile_in_child` runs this file as a script (not `-m`: the child
imports torch's cpp_extension and nothing of ours) in a session of its own, passes it the job as JSON on stdin, and
kills the session (child, ninja, compiler) at the timeout or when it is interrupted itself. On Linux the child asks
to be signalled when its parent dies, and then kills its session too, so that no orphaned compiler goes on writing
into the build directory. On success the child writes DONE into the build directory; the parent then loads
`<build_dir>/<module>.so` with `torch.ops.load_library`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

DONE = "build.done"  # written by the child once the library is built; holds the build's seconds
_PR_SET_PDEATHSIG = 1  # prctl option, <linux/prctl.h>


class CompileError(RuntimeError):
    """The child failed or ran past the timeout; the message says which, with the compiler's output."""


@dataclass(frozen=True, slots=True)
class CompileJob:
    module: str  # the library's name: it is built as <build_dir>/<module>.so
    source: str  # C++ that registers ops with TORCH_LIBRARY_FRAGMENT
    cflags: list[str]
    ldflags: list[str]
    build_dir: str
    headers: dict[str, str] = field(default_factory=dict)  # file name -> text, written beside the source


def compile_in_child(job: CompileJob, timeout_s: float, keep_fds: tuple[int, ...] = ()) -> None:
    """Build `job` in a child process (which inherits `keep_fds`), or raise CompileError."""
    # pip installs ninja beside this interpreter; a venv's bin is not on PATH when its scripts run directly.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    child = subprocess.Popen(
        [sys.executable, "-P", "-W", "ignore", __file__, str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=job.build_dir,
        env={**os.environ, "PATH": path},
        start_new_session=True,
        pass_fds=keep_fds,
    )
    try:
        _, err = child.communicate(json.dumps(asdict(job)), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise CompileError(f"the compile ran past its timeout of {timeout_s:g} s and was stopped") from None
    finally:
        if child.returncode is None:  # timed out or interrupted: stop the child, ninja and the compiler
            kill_session(child.pid)
            child.wait()
    if child.returncode != 0:
        raise CompileError(err.strip() or f"the compile exited with status {child.returncode}")


def main() -> None:
    """The child: build the job read from stdin, write DONE, exit 0; or exit 1 with the reason on stderr."""
    _die_with(parent=int(sys.argv[1]))
    job = CompileJob(**json.load(sys.stdin))
    start = time.perf_counter()
    try:
        from torch.utils import cpp_extension  # imports setuptools

        for header, text in job.headers.items():  # load_inline writes the source here, as main.cpp
            (Path(job.build_dir) / header).write_text(text, encoding="utf-8")
        cpp_extension.load_inline(
            name=job.module,
            cpp_sources=[job.source],
            extra_cflags=job.cflags,
            extra_ldflags=job.ldflags,
            build_directory=job.build_dir,
            is_python_module=False,
            no_implicit_headers=True,
        )
    except (ImportError, OSError, RuntimeError, subprocess.SubprocessError) as e:
        sys.exit(f"{type(e).__name__}: {e}")
    (Path(job.build_dir) / DONE).write_text(f"{time.perf_counter() - start:.1f}\n")


def kill_session(sid: int) -> None:
    """SIGKILL the processes of session `sid` (the child, ninja, the compiler), this one last if it is among them.

    Killing the child's process group is not enough: ninja starts each command in a process group of its own.
    Without /proc (not Linux) only the group of `sid` is killed.
    """
    if not os.path.isdir("/proc"):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sid, signal.SIGKILL)
        return
    for _ in range(10):  # ninja may start a command while we kill: look again
        others = [pid for pid in _session_members(sid) if pid != os.getpid()]
        if not others:
            break
        for pid in others:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if os.getsid(0) == sid:
        os.kill(os.getpid(), signal.SIGKILL)


def _session_members(sid: int) -> list[int]:
    """The live (not zombie) processes of session `sid`, from /proc/<pid>/stat."""
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:  # "pid (comm) state ppid pgrp session ...", where comm may hold spaces and parentheses
            state, _ppid, _pgrp, session = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:4]
        except OSError:  # it has just exited
            continue
        if state != "Z" and int(session) == sid:
            members.append(int(pid))
    return members


def _die_with(parent: int) -> None:
    """On Linux, kill this session (this process, ninja, the compiler) when `parent` dies."""
    if sys.platform != "linux":
        return  # an orphaned build runs to its end, holding the build lock it inherited
    signal.signal(signal.SIGTERM, lambda *_: kill_session(os.getsid(0)))
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl took effect
        kill_session(os.getsid(0))


if __name__ == "__main__":
    main()
