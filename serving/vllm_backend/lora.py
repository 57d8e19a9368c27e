"""Adapter versions as vLLM knows them: each version key (`owner/id@sha`, or a start-up adapter's name) gets its own
`LoRARequest` with a LoRA id never used before, so an overwrite is a new id and requests in flight keep the old one.

vLLM reads a LoRA's files when it first schedules a request for it, and again if its LRU dropped the LoRA meanwhile;
the store deletes an old version's files when it is overwritten. So each uploaded version is served from a snapshot
of hard links (a copy across file systems) taken at its first request, which lives until the version is retired
and its last request has ended. Then vLLM forgets the id (`remove_lora`), and the snapshot is deleted.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from vllm.lora.request import LoRARequest

from switchboard.adapters_store.kinds.base import CONFIG_FILE, WEIGHTS_FILE


@dataclass(slots=True)
class _Version:
    request: LoRARequest
    snapshot: Path | None  # None: a start-up adapter, served from its own directory
    users: int = 0  # requests in flight
    retired: bool = False


class LoraVersions:
    """Thread-safe: requests acquire and release on the event loop, the registry retires from worker threads."""

    def __init__(self, startup: dict[str, Path]) -> None:
        self._startup = {name: Path(path).resolve() for name, path in startup.items()}
        self._ids = itertools.count(1)  # vLLM's LoRA ids start at 1
        self._versions: dict[str, _Version] = {}
        self._lock = threading.Lock()
        self._root = Path(tempfile.mkdtemp(prefix="switchboard-vllm-loras-"))
        self.loads = 0  # versions handed to vLLM for the first time
        self.hits = 0  # requests whose version vLLM already had an id for

    def acquire(self, key: str, directory: Path | None) -> LoRARequest:
        """The LoRARequest for version `key` (`directory`: its files in the store; None for a start-up adapter).
        FileNotFoundError when an uploaded version's files are gone (deleted meanwhile)."""
        with self._lock:
            version = self._versions.get(key)
            if version is None:
                version = self._new_version(key, directory)
                self._versions[key] = version
                self.loads += 1
            else:
                self.hits += 1
            version.users += 1
            return version.request

    def release(self, key: str) -> int | None:
        """A request on `key` ended; the LoRA id to remove from vLLM if that was the last one of a retired version."""
        with self._lock:
            version = self._versions[key]
            version.users -= 1
            return self._drop_if_done(key, version)

    def retire(self, key: str) -> int | None:
        """`key` is no longer current (overwritten, deleted); the LoRA id to remove from vLLM if nothing uses it."""
        with self._lock:
            version = self._versions.get(key)
            if version is None:  # never requested: vLLM never saw it
                return None
            version.retired = True
            return self._drop_if_done(key, version)

    def known(self) -> list[str]:
        with self._lock:
            return sorted(self._versions)

    def in_use(self) -> list[str]:
        with self._lock:
            return sorted(key for key, v in self._versions.items() if v.users)

    def close(self) -> None:
        shutil.rmtree(self._root, ignore_errors=True)

    def _new_version(self, key: str, directory: Path | None) -> _Version:
        lora_id = next(self._ids)
        if directory is None:
            if key not in self._startup:
                raise KeyError(f"unknown adapter {key!r}")
            return _Version(LoRARequest(key, lora_id, str(self._startup[key])), None)
        snapshot = self._root / str(lora_id)
        snapshot.mkdir()
        try:
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                _link_or_copy(directory / name, snapshot / name)
        except OSError:
            shutil.rmtree(snapshot, ignore_errors=True)
            raise
        return _Version(LoRARequest(key, lora_id, str(snapshot)), snapshot)

    def _drop_if_done(self, key: str, version: _Version) -> int | None:
        if not version.retired or version.users:
            return None
        del self._versions[key]
        if version.snapshot is not None:
            shutil.rmtree(version.snapshot, ignore_errors=True)
        return version.request.lora_int_id


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed: a copy does the same job
        shutil.copyfile(source, target)
