"""Where uploaded adapters live on disk: content-addressed versions plus one manifest, both written atomically.

Layout under the store root:
- `blobs/<sha256>/adapter_config.json`, `blobs/<sha256>/adapter_model.safetensors`: one directory per distinct
  version, named by the sha256 of its two files (see `content_sha256`); never modified once renamed into place.
- `manifest.json`: every visible adapter `(owner, id)` -> its current version's metadata. Replaced atomically
  (temporary file, fsync, rename, fsync of the directory), so a reader sees the old or the new manifest, never half.
- `tmp/`: uploads being written. A version becomes visible only by the manifest rename, so a process killed at any
  moment leaves at most a staging directory or an unreferenced blob; `open` removes both.
- `.lock`: several processes (replicas, on one machine or on a shared filesystem) may open one store. Every change
  reads the manifest, changes it and writes it under an exclusive `flock` of this file, and readers reload the
  manifest whenever its file changed, so an upload through one process is visible to every other at its next
  lookup. Each staging directory has a `tmp/<name>.lock` held while it is written: cleaning removes only staging
  directories whose writer is gone.

The store knows nothing of HTTP or the engine: callers validate a staged upload (`adapters_store.kinds`) before
`commit`, and callers drop old versions from memory once `commit`/`delete` says which version left.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from switchboard.adapters_store.kinds.base import CONFIG_FILE, WEIGHTS_FILE

MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
MANIFEST_FORMAT = 1
ADAPTER_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
CHUNK = 1 << 20


class StoreError(Exception):
    """A store operation refused: `reason` is one of the class constants, the message says why."""

    EXISTS = "exists"
    NOT_FOUND = "not_found"
    INVALID_ID = "invalid_id"
    LIMIT = "limit"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_adapter_id(adapter_id: str) -> None:
    """Ids are `[A-Za-z0-9._-]{1,128}` and not `.` or `..` (they never become paths, but stay safe if they do)."""
    if not ADAPTER_ID.fullmatch(adapter_id) or adapter_id in (".", ".."):
        shown = adapter_id if len(adapter_id) <= 40 else adapter_id[:40] + "..."
        raise StoreError(
            StoreError.INVALID_ID,
            f"adapter id {shown!r} is invalid: use 1 to 128 characters from A-Z, a-z, 0-9, '.', '_' and '-'",
        )


def version_key(owner: str, adapter_id: str, sha256: str) -> str:
    """The engine's name for one version: a new version is a new name, so running requests keep the old one."""
    return f"{owner}/{adapter_id}@{sha256[:16]}"


@dataclass(frozen=True, slots=True)
class StoredAdapter:
    """One visible adapter: its current version and what the upload answer reports."""

    id: str
    owner: str
    public: bool
    kind: str
    rank: int
    target_modules: list[str]
    num_parameters: int
    size_bytes: int
    sha256: str
    version: int
    created: int

    @property
    def key(self) -> str:
        return version_key(self.owner, self.id, self.sha256)

    def to_json(self) -> dict[str, object]:
        # Field by field rather than `asdict` (which deep-copies): the manifest of a thousand adapters is rewritten
        # on every upload, and asdict made half of that write's 25 ms.
        return {f: getattr(self, f) for f in self.__slots__}


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    """What validation found in a staged upload (the fields `commit` records besides id, owner and version)."""

    kind: str
    rank: int
    target_modules: list[str]
    num_parameters: int


class StagedFile:
    """One file being written into a staging directory, hashed as it goes; `close` fsyncs it."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._digest.update(chunk)
        self.size += len(chunk)

    def close(self) -> str:
        """Flush and fsync; the sha256 of what was written."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        return self._digest.hexdigest()


class Staging:
    """A directory under `tmp/` receiving one upload's two files; hashes them as they are written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._digests: dict[str, str] = {}
        self.size_bytes = 0

    def begin(self, name: str) -> StagedFile:
        if name not in (CONFIG_FILE, WEIGHTS_FILE):
            raise ValueError(f"unexpected file {name!r}")
        return StagedFile(self.path / name)

    def finish(self, name: str, file: StagedFile) -> None:
        self._digests[name] = file.close()
        self.size_bytes += file.size

    def write(self, name: str, chunks: Iterator[bytes]) -> int:
        """Write file `name` from `chunks`, fsync it; its size."""
        file = self.begin(name)
        try:
            for chunk in chunks:
                file.write(chunk)
        finally:
            self.finish(name, file)
        return file.size

    def has(self, name: str) -> bool:
        return name in self._digests

    def copy_from(self, source: Path) -> None:
        """Copy a PEFT directory's two files (used by `load_lora_adapter`)."""
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            with open(source / name, "rb") as f:
                self.write(name, iter(lambda f=f: f.read(CHUNK), b""))

    @property
    def sha256(self) -> str:
        return content_sha256(self._digests[CONFIG_FILE], self._digests[WEIGHTS_FILE])


def content_sha256(config_digest: str, weights_digest: str) -> str:
    """A version's address: sha256 over the two files' own sha256 digests, in a fixed order."""
    return hashlib.sha256(f"{CONFIG_FILE}:{config_digest}\n{WEIGHTS_FILE}:{weights_digest}\n".encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterStore:
    """The disk tier. Thread-safe: the API calls it from worker threads."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        for d in (self.root, self.blobs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._lock_fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        self._deferred = False
        self._manifest_stamp: tuple[int, int, int] | None = None
        self._entries: dict[tuple[str, str], StoredAdapter] = {}
        self.generation = 0  # bumped whenever the entries change (here or read from another process's write)
        with self._exclusive():
            self._clean()

    def __del__(self) -> None:
        with contextlib.suppress(AttributeError, OSError):
            os.close(self._lock_fd)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """This thread alone in this process, and this process alone among those sharing the store; the entries
        are the manifest's current ones inside. Re-entrant (a batch holds it across its commits)."""
        with self._lock:
            if self._deferred:  # inside batch(): the lock is held and the entries are ahead of the manifest
                yield
                return
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                self.refresh()
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # ---- start-up ---------------------------------------------------------------------------------------------
    def _stamp(self) -> tuple[int, int, int] | None:
        """What identifies the manifest file now: each write replaces it (a new inode), so a change shows."""
        try:
            st = os.stat(self.root / MANIFEST)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def refresh(self) -> None:
        """Reload the manifest if another process (or this one) replaced it since it was last read."""
        with self._lock:
            if self._deferred:
                return
            stamp = self._stamp()
            if stamp != self._manifest_stamp or stamp is None:
                self._entries = self._read_manifest()
                self._manifest_stamp = stamp
                self.generation += 1

    def _read_manifest(self) -> dict[tuple[str, str], StoredAdapter]:
        path = self.root / MANIFEST
        if not path.exists():
            return {}
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{path}: unknown manifest format {raw.get('format')!r}")
        entries = [StoredAdapter(**item) for item in raw["adapters"]]
        return {(e.owner, e.id): e for e in entries}

    def _clean(self) -> None:
        """Remove what an interrupted process left: staging directories no writer holds, temporary manifests,
        unreferenced blobs (under the exclusive lock: another process's commit is never half seen)."""
        for lock in self.tmp.glob("*.lock"):
            with _try_flock(lock) as free:
                if free:
                    shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
                    lock.unlink(missing_ok=True)
        for child in self.tmp.iterdir():
            if child.is_dir() and not child.with_suffix(".lock").exists():  # a staging directory of an older store
                shutil.rmtree(child, ignore_errors=True)
        for child in self.root.glob(f".{MANIFEST}.*"):
            child.unlink(missing_ok=True)
        referenced = {e.sha256 for e in self._entries.values()}
        for blob in self.blobs.iterdir():
            if blob.name not in referenced:
                shutil.rmtree(blob) if blob.is_dir() else blob.unlink()

    # ---- reading ----------------------------------------------------------------------------------------------
    def get(self, owner: str, adapter_id: str) -> StoredAdapter | None:
        self.refresh()
        return self._entries.get((owner, adapter_id))

    def entries(self) -> list[StoredAdapter]:
        self.refresh()
        return sorted(self._entries.values(), key=lambda e: (e.owner, e.id))

    def count(self, owner: str) -> int:
        self.refresh()
        return sum(1 for o, _ in self._entries if o == owner)

    def path(self, entry: StoredAdapter) -> Path:
        """The PEFT directory of `entry`'s version."""
        return self.blobs / entry.sha256

    def size_bytes(self) -> int:
        """Bytes of the distinct versions on disk."""
        self.refresh()
        seen: dict[str, int] = {e.sha256: e.size_bytes for e in self._entries.values()}
        return sum(seen.values())

    # ---- writing ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Write the manifest once at the end instead of after every commit (bulk imports of many adapters).

        A crash inside the batch loses all of it, never part of it: its blobs are unreferenced until that one write.
        """
        with self._exclusive():
            self._deferred = True
            try:
                yield
            finally:
                self._deferred = False
                self._write_manifest(self._entries)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Staging]:
        """A fresh staging directory, removed on exit whatever happened (commit moves its content out first)."""
        path = self.tmp / uuid.uuid4().hex
        # Locked before it gets the name that _clean looks for, so no other process can take it in between.
        fresh = path.with_suffix(".new")
        lock_fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)  # held while written: another process's _clean leaves it alone
            fresh.rename(path.with_suffix(".lock"))
            path.mkdir()
            yield Staging(path)
        finally:
            shutil.rmtree(path, ignore_errors=True)
            path.with_suffix(".lock").unlink(missing_ok=True)
            fresh.unlink(missing_ok=True)
            os.close(lock_fd)

    def commit(
        self,
        staging: Staging,
        owner: str,
        adapter_id: str,
        info: AdapterInfo,
        *,
        overwrite: bool = False,
        public: bool = False,
        max_per_owner: int | None = None,
    ) -> tuple[StoredAdapter, StoredAdapter | None]:
        """Make a validated staged upload the current version of `(owner, adapter_id)`; (new entry, replaced one).

        Raises StoreError EXISTS (id taken and not `overwrite`) or LIMIT (`max_per_owner` reached); the store is
        then unchanged.
        """
        check_adapter_id(adapter_id)
        sha = staging.sha256
        with self._exclusive():
            old = self._entries.get((owner, adapter_id))
            if old is not None and not overwrite:
                raise StoreError(
                    StoreError.EXISTS,
                    f"adapter {adapter_id!r} already exists (version {old.version}); "
                    "upload with ?overwrite=true to make a new version",
                )
            if old is None and max_per_owner is not None and self.count(owner) >= max_per_owner:
                raise StoreError(
                    StoreError.LIMIT,
                    f"this tenant already has {self.count(owner)} adapters, the limit (--max-adapters-per-tenant); "
                    "delete one before uploading another",
                )
            blob = self.blobs / sha
            if not blob.exists():
                _fsync_dir(staging.path)
                staging.path.rename(blob)
                _fsync_dir(self.blobs)
            entry = StoredAdapter(
                id=adapter_id,
                owner=owner,
                public=public,
                kind=info.kind,
                rank=info.rank,
                target_modules=info.target_modules,
                num_parameters=info.num_parameters,
                size_bytes=staging.size_bytes,
                sha256=sha,
                version=1 if old is None else old.version + 1,
                created=int(time.time()),
            )
            entries = {**self._entries, (owner, adapter_id): entry}
            self._write_manifest(entries)
            self._entries = entries
            self.generation += 1
            if old is not None and old.sha256 != sha:
                self._drop_blob_if_unused(old.sha256)
            return entry, old

    def set_public(self, owner: str, adapter_id: str, public: bool) -> StoredAdapter:
        with self._exclusive():
            entry = self._require(owner, adapter_id)
            updated = replace(entry, public=public)
            entries = {**self._entries, (owner, adapter_id): updated}
            self._write_manifest(entries)
            self._entries = entries
            self.generation += 1
            return updated

    def delete(self, owner: str, adapter_id: str) -> StoredAdapter:
        """Remove `(owner, adapter_id)`; its files go once no other entry shares the version (callers keep parsed
        copies for requests already running)."""
        with self._exclusive():
            entry = self._require(owner, adapter_id)
            entries = {k: v for k, v in self._entries.items() if k != (owner, adapter_id)}
            self._write_manifest(entries)
            self._entries = entries
            self.generation += 1
            self._drop_blob_if_unused(entry.sha256)
            return entry

    def _require(self, owner: str, adapter_id: str) -> StoredAdapter:
        entry = self._entries.get((owner, adapter_id))
        if entry is None:
            raise StoreError(StoreError.NOT_FOUND, f"adapter {adapter_id!r} does not exist")
        return entry

    def _drop_blob_if_unused(self, sha: str) -> None:
        if all(e.sha256 != sha for e in self._entries.values()):
            shutil.rmtree(self.blobs / sha, ignore_errors=True)

    def _write_manifest(self, entries: dict[tuple[str, str], StoredAdapter]) -> None:
        if self._deferred:
            return
        body = {
            "format": MANIFEST_FORMAT,
            "adapters": [e.to_json() for e in sorted(entries.values(), key=lambda e: (e.owner, e.id))],
        }
        tmp = self.root / f".{MANIFEST}.{uuid.uuid4().hex}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(body, separators=(",", ":")))  # one string: json.dump's many small writes are slower
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / MANIFEST)
        _fsync_dir(self.root)
        self._manifest_stamp = self._stamp()  # what this process wrote is what it holds: no reread


@contextlib.contextmanager
def _try_flock(path: Path) -> Iterator[bool]:
    """Whether an exclusive lock of `path` could be had now (True: no live process holds it), held inside."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
