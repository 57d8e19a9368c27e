"""The disk store on its own: versions by sha256, the manifest across reopenings, refusals that change nothing, and
the clean-up of what an interrupted process leaves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from switchboard.adapters_store.kinds.base import CONFIG_FILE, WEIGHTS_FILE
from switchboard.adapters_store.store import AdapterInfo, AdapterStore, StoreError, check_adapter_id

INFO = AdapterInfo(kind="lora", rank=2, target_modules=["q_proj"], num_parameters=10)


def _put(store: AdapterStore, owner: str, adapter_id: str, weights: bytes, **kw):
    with store.staging() as staging:
        staging.write(CONFIG_FILE, iter([b'{"peft_type": "LORA"}']))
        staging.write(WEIGHTS_FILE, iter([weights[:3], weights[3:]]))
        return store.commit(staging, owner, adapter_id, INFO, **kw)


def test_versions_manifest_and_reopen(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    first, old = _put(store, "t", "a", b"version-one")
    assert old is None and first.version == 1 and len(first.sha256) == 64
    assert (store.path(first) / WEIGHTS_FILE).read_bytes() == b"version-one"
    with pytest.raises(StoreError) as err:
        _put(store, "t", "a", b"version-two")
    assert err.value.reason == StoreError.EXISTS
    second, old = _put(store, "t", "a", b"version-two", overwrite=True)
    assert old == first and second.version == 2 and second.key != first.key
    assert not store.path(first).exists()  # the old version's files go; running requests hold parsed copies
    same, _ = _put(store, "u", "a", b"version-two")  # same content, other owner: one blob, two entries
    assert same.sha256 == second.sha256 and len(list(store.blobs.iterdir())) == 1
    reopened = AdapterStore(tmp_path)
    assert reopened.get("t", "a") == second and reopened.get("u", "a") == same
    reopened.delete("t", "a")
    assert store.path(same).exists()  # still used by u/a
    assert json.loads((tmp_path / "manifest.json").read_text())["adapters"][0]["owner"] == "u"


def test_limit_and_refusals_leave_the_store_unchanged(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    _put(store, "t", "a", b"1", max_per_owner=1)
    manifest = (tmp_path / "manifest.json").read_bytes()
    with pytest.raises(StoreError) as err:
        _put(store, "t", "b", b"2", max_per_owner=1)
    assert err.value.reason == StoreError.LIMIT and "--max-adapters-per-tenant" in str(err.value)
    assert (tmp_path / "manifest.json").read_bytes() == manifest
    assert len(list(store.blobs.iterdir())) == 1 and list(store.tmp.iterdir()) == []


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".", "..", "a" * 129, "é", "a b"])
def test_invalid_ids(bad: str) -> None:
    with pytest.raises(StoreError):
        check_adapter_id(bad)


def test_open_removes_staging_leftovers_and_orphan_blobs(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    kept, _ = _put(store, "t", "kept", b"kept")
    (store.tmp / "deadbeef").mkdir()
    (store.tmp / "deadbeef" / WEIGHTS_FILE).write_bytes(b"half")
    (store.blobs / ("0" * 64)).mkdir()  # renamed into place, manifest never written
    (tmp_path / ".manifest.json.123").write_text("{")
    AdapterStore(tmp_path)
    assert list(store.tmp.iterdir()) == []
    assert [p.name for p in store.blobs.iterdir()] == [kept.sha256]
    assert not (tmp_path / ".manifest.json.123").exists()
