"""`switchboard serve` in a process of its own, as an operator starts it, on state the caller owns: a port of
127.0.0.1, a working directory and an adapter store, its output in a log file there. The tests and the soak
(`loadtest/soak.py`, which kills it and starts it again on the same port and store) share it."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

# Long enough for the first server of a session to build the C++ kernels (the session's cache starts empty).
STARTUP_TIMEOUT_S = 120


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now (the kernel picks it for a socket bound to port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is `pid` (the server's engine core, its compilers): from each process's stat line,
    where the field after the state is the parent's pid."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


class ServeProcess:
    """`switchboard serve --model MODEL --store STORE --port PORT *flags`, run in `workdir` with its output appended
    to `workdir/serve.log`; answering /health when the constructor returns. The store defaults to `workdir/store`,
    the port to a free one."""

    def __init__(
        self,
        workdir: Path,
        model: Path,
        *flags: str,
        store: Path | None = None,
        port: int | None = None,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "serve.log"
        # The server runs in `workdir`: paths relative to the caller's directory are made absolute first.
        self.store = (store or workdir / "store").absolute()
        cmd = [str(Path(sys.executable).with_name("switchboard")), "serve", "--model", str(Path(model).absolute())]
        cmd += ["--store", str(self.store), "--port", str(self.port), *flags]
        self._log = self.log.open("ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir)
        deadline = time.monotonic() + startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"switchboard serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        log = self.log.read_text()
        raise RuntimeError(f"switchboard serve did not answer /health in {startup_timeout_s} s:\n{log}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> None:
        """Signal the server and wait `timeout_s` for it to exit (Ray Serve's replicas take longer), then kill it."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
