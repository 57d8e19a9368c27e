"""Which adapters a tenant sees and uses, and how uploads become versions: the API's policy over the disk store, the
host tier and the engine.

- Visibility: a tenant's own adapters, then the public ones (start-up `--adapter` adapters and those an admin
  published); an own adapter shadows a public one of the same id. Anything else answers 404, as if absent.
- An upload is staged under the store's `tmp/`, validated by `adapters_store.kinds` against the base model and the
  limits, then committed (a new sha256-addressed version); the parsed adapter goes straight into the host tier.
- The engine names each version `owner/id@sha` (`StoredAdapter.key`): an overwrite makes a new name, requests already
  running keep the old one, and the old version is retired from the device once they finish.
Methods that touch the disk are synchronous; the routes run them in worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from switchboard.adapters_store.kinds import (
    Adapter,
    AdapterError,
    BaseModelShape,
    LoraAdapter,
    PrefixAdapter,
    load_adapter,
)
from switchboard.adapters_store.kinds.base import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE
from switchboard.adapters_store.store import (
    AdapterInfo,
    AdapterStore,
    Staging,
    StoredAdapter,
    StoreError,
    check_adapter_id,
    version_key,
)
from switchboard.serving.adapters.host_cache import HostCache
from switchboard.serving.api.auth import Tenant
from switchboard.serving.api.errors import ApiError, bad_request
from switchboard.serving.config import ServeConfig

UPLOAD_FILES = (CONFIG_FILE, WEIGHTS_FILE)


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """An adapter as one tenant sees it."""

    id: str
    key: str  # the engine's name for the version in use
    kind: str
    stored: StoredAdapter | None  # None: a start-up adapter (the engine holds it, nothing on disk)

    def to_json(self) -> dict[str, object]:
        if self.stored is not None:
            return {"object": "adapter", **self.stored.to_json()}
        return {"object": "adapter", "id": self.id, "kind": self.kind, "owner": None, "public": True}


def not_found(adapter_id: str) -> ApiError:
    return ApiError(404, f"The adapter `{adapter_id}` does not exist.", code="adapter_not_found", param="adapter_id")


def forbidden(message: str) -> ApiError:
    return ApiError(403, message, type="permission_error", code="permission_denied")


def invalid_path(path: str, why: str) -> ApiError:
    shown = path if len(path) <= 80 else path[:80] + "..."
    return bad_request(f"`lora_path` {shown!r} cannot be used: {why}.", param="lora_path", code="invalid_path")


def unprocessable(exc: Exception) -> ApiError:
    return ApiError(422, f"Invalid adapter: {exc}", code="invalid_adapter")


class AdapterRegistry:
    def __init__(
        self,
        config: ServeConfig,
        store: AdapterStore,
        startup: Mapping[str, str],  # id -> kind of the --adapter adapters
        base: BaseModelShape,
        host: HostCache,
        retire: Callable[[str], None],  # tell the engine a version is no longer current
    ) -> None:
        self.config = config
        self.store = store
        self.startup = dict(startup)
        self.base = base
        self.host = host
        self.retire = retire
        self._lock = threading.Lock()
        self._public: dict[str, StoredAdapter] = {}
        self._index_public()

    def _index_public(self) -> None:
        public = {}
        for e in self.store.entries():
            if e.public:
                public.setdefault(e.id, e)
        self._public = public

    # ---- reading ----------------------------------------------------------------------------------------------
    def lookup(self, tenant: Tenant, adapter_id: str) -> AdapterRef | None:
        own = self.store.get(tenant.name, adapter_id)
        if own is not None:
            return AdapterRef(own.id, own.key, own.kind, own)
        kind = self.startup.get(adapter_id)
        if kind is not None:
            return AdapterRef(adapter_id, adapter_id, kind, None)
        public = self._public.get(adapter_id)
        if public is not None:
            return AdapterRef(public.id, public.key, public.kind, public)
        return None

    def require(self, tenant: Tenant, adapter_id: str) -> AdapterRef:
        ref = self.lookup(tenant, adapter_id)
        if ref is None:
            raise not_found(adapter_id)
        return ref

    def visible(self, tenant: Tenant) -> list[AdapterRef]:
        refs: dict[str, AdapterRef] = {name: AdapterRef(name, name, kind, None) for name, kind in self.startup.items()}
        for e in self._public.values():
            refs.setdefault(e.id, AdapterRef(e.id, e.key, e.kind, e))
        for e in self.store.entries():
            if e.owner == tenant.name:
                refs[e.id] = AdapterRef(e.id, e.key, e.kind, e)
        return [refs[k] for k in sorted(refs)]

    def parsed(self, ref: AdapterRef) -> Adapter | None:
        """The parsed adapter for a store version (host tier, parsing from disk on a miss); None for start-up ones.

        Call from a worker thread. A version deleted meanwhile answers 404."""
        stored = ref.stored
        if stored is None:
            return None
        try:
            return self.host.get(ref.key, lambda: load_adapter(self.store.path(stored), self.base, ref.key))
        except (FileNotFoundError, AdapterError) as exc:
            raise not_found(ref.id) from exc

    def directory(self, ref: AdapterRef) -> Path:
        """A store version's directory, for an engine that parses adapters itself (the engine core process)."""
        assert ref.stored is not None
        return self.store.path(ref.stored)

    # ---- writing ----------------------------------------------------------------------------------------------
    def upload(
        self,
        tenant: Tenant,
        adapter_id: str,
        staging: Staging,
        files: list[str],
        *,
        overwrite: bool = False,
        public: bool = False,
    ) -> StoredAdapter:
        """Validate and commit an upload streamed into `staging` (`files`: the names of every file part sent).

        The store is unchanged on any error (the caller's staging context removes the staged files)."""
        self._check_id(adapter_id)
        if public and not tenant.admin:
            raise forbidden("Only an admin key can publish an adapter to every tenant (public=true).")
        for name in files:
            if name not in UPLOAD_FILES:
                if name.endswith(PICKLE_SUFFIXES):
                    raise unprocessable(
                        AdapterError("pickle files are never loaded; upload adapter_model.safetensors", name)
                    )
                raise bad_request(f"Unexpected file `{name}`: upload {CONFIG_FILE} and {WEIGHTS_FILE}.", param=name)
        for name in UPLOAD_FILES:
            if not staging.has(name):
                raise unprocessable(AdapterError("missing from the upload", name))
        return self._commit(tenant, adapter_id, staging, overwrite=overwrite, public=public)

    def import_dir(self, tenant: Tenant, adapter_id: str, path: str) -> StoredAdapter:
        """`load_lora_adapter`: copy a PEFT directory under `--import-dir` into the store as a new adapter."""
        self._check_id(adapter_id, param="lora_name")
        source = self._importable(path)
        with self.store.staging() as staging:
            try:
                staging.copy_from(source)
            except FileNotFoundError as exc:
                raise unprocessable(AdapterError("missing", Path(exc.filename or "").name or None)) from exc
            except OSError as exc:  # a file that is a symbolic link loop, a directory, unreadable
                file = Path(exc.filename or "").name or None
                raise unprocessable(AdapterError(f"cannot be read ({exc.strerror})", file)) from exc
            return self._commit(tenant, adapter_id, staging, overwrite=False, public=False)

    def delete(self, tenant: Tenant, adapter_id: str) -> StoredAdapter:
        if self.store.get(tenant.name, adapter_id) is None:
            if self.lookup(tenant, adapter_id) is not None:  # visible to the caller, but not theirs
                raise forbidden(f"The adapter `{adapter_id}` is shared with every tenant; only its owner deletes it.")
            raise not_found(adapter_id)
        with self._lock:
            try:
                entry = self.store.delete(tenant.name, adapter_id)
            except StoreError as exc:  # deleted concurrently
                raise not_found(adapter_id) from exc
            self._index_public()
        self.host.drop(entry.key)
        self.retire(entry.key)
        return entry

    def _check_id(self, adapter_id: str, param: str = "adapter_id") -> None:
        try:
            check_adapter_id(adapter_id)
        except StoreError as exc:
            raise bad_request(str(exc), param=param, code="invalid_adapter_id") from exc

    def _importable(self, path: str) -> Path:
        root = self.config.import_dir
        if root is None:
            raise forbidden("Loading adapters from a path is disabled: start the server with --import-dir DIR.")
        root = root.resolve()
        candidate = Path(path) if Path(path).is_absolute() else root / path
        outside = forbidden(f"`lora_path` must lie under the server's import directory ({root}).")
        try:
            resolved = candidate.resolve()  # follows symlinks and `..`
            if not resolved.is_relative_to(root):
                raise outside
            is_dir = resolved.is_dir()
        except ValueError as exc:
            raise invalid_path(path, "it contains a NUL byte") from exc
        except RuntimeError as exc:  # Python 3.11's pathlib on a symbolic link loop
            raise invalid_path(path, "a symbolic link loop") from exc
        except OSError as exc:  # a name too long; a loop on newer Pythons
            raise invalid_path(path, exc.strerror or str(exc)) from exc
        if not is_dir:
            raise ApiError(404, f"`lora_path` {path!r} is not a directory.", code="path_not_found", param="lora_path")
        for name in UPLOAD_FILES:  # a file may itself be a link out of the import directory
            if (resolved / name).exists() and not (resolved / name).resolve().is_relative_to(root):
                raise outside
        return resolved

    def _commit(
        self, tenant: Tenant, adapter_id: str, staging: Staging, *, overwrite: bool, public: bool
    ) -> StoredAdapter:
        key = version_key(tenant.name, adapter_id, staging.sha256)
        try:
            adapter = load_adapter(staging.path, self.base, key)
        except AdapterError as exc:
            raise unprocessable(exc) from exc
        self._check_limits(adapter)
        info = AdapterInfo(
            kind=adapter.kind.value,
            rank=adapter.rank,
            target_modules=sorted({module for _, module in adapter.modules()}),
            num_parameters=adapter.num_parameters,
        )
        with self._lock:
            try:
                entry, old = self.store.commit(
                    staging,
                    tenant.name,
                    adapter_id,
                    info,
                    overwrite=overwrite,
                    public=public,
                    max_per_owner=self.config.max_adapters_per_tenant,
                )
            except StoreError as exc:
                code = "adapter_exists" if exc.reason == StoreError.EXISTS else "too_many_adapters"
                raise ApiError(409, str(exc), code=code, param="adapter_id") from exc
            self._index_public()
        self.host.put(entry.key, adapter)
        if old is not None and old.key != entry.key:
            self.host.drop(old.key)
            self.retire(old.key)
        return entry

    def _check_limits(self, adapter: Adapter) -> None:
        c = self.config
        if isinstance(adapter, LoraAdapter) and adapter.rank > c.max_lora_rank:
            raise unprocessable(
                AdapterError(f"LoRA rank {adapter.rank} exceeds this server's limit --max-lora-rank {c.max_lora_rank}")
            )
        if isinstance(adapter, PrefixAdapter) and adapter.num_virtual_tokens > c.max_virtual_tokens:
            raise unprocessable(
                AdapterError(
                    f"{adapter.num_virtual_tokens} virtual tokens exceed this server's limit "
                    f"--max-virtual-tokens {c.max_virtual_tokens}"
                )
            )
