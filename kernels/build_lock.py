"""A build lock that the OS releases when its holder dies, and that names its holder to the processes waiting on it.

torch's own build lock (a `lock` file created with O_EXCL) outlives a process killed mid-build, and torch waits on it
with no timeout. Our builds take this lock first: `fcntl.flock` on `<build_dir>/build.lock`, into which the holder
writes its pid and start time. A waiter reports the holder every ~10 s and gives up once the holder has been at it
longer than the build's timeout. A holder that finishes empties the file, so a record found on taking the lock was
left by a holder that died mid-build.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

POLL_S = 0.2
REPORT_EVERY_S = 10.0


class BuildLockTimeout(TimeoutError):
    """The lock's holder has been building for longer than the build's timeout."""


@dataclass(frozen=True, slots=True)
class Holder:
    """What a holder writes into the lock file."""

    pid: int
    started: float  # time.time() when it took the lock (wall clock: compared across processes)

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # alive, another user's
            return True
        return True


def read_holder(path: Path) -> Holder | None:
    """The record in a lock file; None where it is empty (released cleanly, or taken a moment ago) or unreadable."""
    try:
        pid, started = path.read_text().split()
        return Holder(int(pid), float(started))
    except (OSError, ValueError):
        return None


@contextmanager
def build_lock(path: Path, timeout_s: float, report_every_s: float = REPORT_EVERY_S) -> Iterator[int]:
    """Hold the lock at `path`, waiting while another holder has held it less than `timeout_s`.

    Yields the lock's file descriptor: a child process given it (`pass_fds`) holds the lock too, until it exits.
    Raises BuildLockTimeout where the holder is past the timeout.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path, timeout_s, report_every_s)
        left = read_holder(path)
        if left is not None:
            logger.warning(
                "%s was left by pid %d (started %.0f s ago), which died mid-build; taking it over",
                path,
                left.pid,
                time.time() - left.started,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {time.time():.3f}\n".encode(), 0)
        try:
            yield fd
        finally:
            os.ftruncate(fd, 0)  # finished, successfully or not: no holder left behind
    finally:
        os.close(fd)  # releases the flock (if a child given the descriptor has exited too)


def _acquire(fd: int, path: Path, timeout_s: float, report_every_s: float) -> None:
    """Take the flock, polling; report the holder now and every `report_every_s`; give up past `timeout_s`."""
    waiting_since = next_report = time.time()
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        holder = read_holder(path)
        if holder is not None and holder.alive():
            who, held_s = f"pid {holder.pid}", time.time() - holder.started
        else:  # no record yet, or one left by a holder that died (a child it passed the lock to holds it): our wait
            who, held_s = "another process", time.time() - waiting_since
        if held_s > timeout_s:
            raise BuildLockTimeout(f"{who} has held {path} for {held_s:.0f} s, past the timeout ({timeout_s:g} s)")
        now = time.time()
        if now >= next_report:
            logger.info(
                "waiting for %s, which has been building in %s for %.0f s (giving up at %g s)",
                who,
                path.parent,
                held_s,
                timeout_s,
            )
            next_report = now + report_every_s
        time.sleep(POLL_S)
