"""One store directory opened by several processes (the replicas of `serve --replicas N`): each sees the others'
commits and deletes at its next read, concurrent commits all land, and opening a store never removes an upload
another process is still writing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from switchboard.adapters_store.kinds.base import CONFIG_FILE, WEIGHTS_FILE
from switchboard.adapters_store.store import AdapterInfo, AdapterStore

INFO = AdapterInfo(kind="lora", rank=2, target_modules=["q_proj"], num_parameters=10)

WRITER = """
import sys
from switchboard.adapters_store.store import AdapterInfo, AdapterStore
store = AdapterStore(sys.argv[1])
info = AdapterInfo(kind="lora", rank=2, target_modules=["q_proj"], num_parameters=10)
for i in range(int(sys.argv[3])):
    with store.staging() as staging:
        staging.write("adapter_config.json", iter([b"{}"]))
        staging.write("adapter_model.safetensors", iter([f"{sys.argv[2]}-{i}".encode()]))
        store.commit(staging, sys.argv[2], f"a{i}", info)
"""


def _put(store: AdapterStore, owner: str, adapter_id: str, weights: bytes, **kw):
    with store.staging() as staging:
        staging.write(CONFIG_FILE, iter([b"{}"]))
        staging.write(WEIGHTS_FILE, iter([weights]))
        return store.commit(staging, owner, adapter_id, INFO, **kw)


def test_a_commit_or_delete_in_one_store_shows_in_the_other(tmp_path: Path) -> None:
    one, two = AdapterStore(tmp_path), AdapterStore(tmp_path)
    first, _ = _put(one, "t", "a", b"v1")
    assert two.get("t", "a") == first
    generation = two.generation
    second, old = _put(two, "t", "a", b"v2", overwrite=True)  # two read one's version before replacing it
    assert old == first and second.version == 2
    assert one.get("t", "a") == second and two.generation > generation
    _put(one, "t", "b", b"b")
    assert [e.id for e in two.entries()] == ["a", "b"]  # one's commit kept two's overwrite
    two.delete("t", "a")
    assert one.get("t", "a") is None and not one.path(second).exists()


def test_concurrent_writers_in_separate_processes_all_land(tmp_path: Path) -> None:
    writers = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER), str(tmp_path), owner, "15"], cwd=tmp_path)
        for owner in ("x", "y", "z")
    ]
    assert [w.wait(120) for w in writers] == [0, 0, 0]
    entries = AdapterStore(tmp_path).entries()
    assert len(entries) == 45
    assert len({e.sha256 for e in entries}) == 45 and all((tmp_path / "blobs" / e.sha256).is_dir() for e in entries)


def test_opening_a_store_keeps_an_upload_being_written(tmp_path: Path) -> None:
    writer = AdapterStore(tmp_path)
    with writer.staging() as staging:
        staging.write(CONFIG_FILE, iter([b"{}"]))
        AdapterStore(tmp_path)  # another replica starting: its clean-up leaves the live staging directory alone
        assert staging.path.is_dir()
        staging.write(WEIGHTS_FILE, iter([b"w"]))
        entry, _ = writer.commit(staging, "t", "a", INFO)
    assert AdapterStore(tmp_path).get("t", "a") == entry
    (writer.tmp / "abandoned").mkdir()  # a writer killed mid-upload: its lock is free
    (writer.tmp / "abandoned.lock").touch()
    AdapterStore(tmp_path)
    assert list(writer.tmp.iterdir()) == []
