"""Adapter versions as vLLM LoRA ids (serving/vllm_backend/lora.py): a new version is a new id, a retired version
lives while requests use it, and its snapshot outlives the store's copy of its files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the vLLM backend's tests run in `make test-vllm` (vLLM's own venv)")

from switchboard.serving.vllm_backend.lora import LoraVersions

FILES = ("adapter_config.json", "adapter_model.safetensors")


def version_dir(root: Path, name: str) -> Path:
    directory = root / name
    directory.mkdir()
    for file in FILES:
        (directory / file).write_text(f"{name}/{file}")
    return directory


def test_each_version_gets_a_new_id_and_keeps_it_while_in_use(tmp_path: Path) -> None:
    versions = LoraVersions({"start": tmp_path})
    v1 = version_dir(tmp_path, "v1")
    first = versions.acquire("t/a@1", v1)
    assert versions.acquire("t/a@1", v1).lora_int_id == first.lora_int_id  # a second request on the same version
    second = versions.acquire("t/a@2", version_dir(tmp_path, "v2"))
    assert second.lora_int_id != first.lora_int_id
    assert versions.acquire("start", None).lora_path == str(tmp_path.resolve())  # start-up: its own directory

    shutil.rmtree(v1)  # the store dropped version 1's files on the overwrite
    assert versions.retire("t/a@1") is None  # two requests still run on it
    snapshot = Path(first.lora_path)
    assert (snapshot / FILES[1]).read_text() == "v1/adapter_model.safetensors"
    assert versions.release("t/a@1") is None
    assert versions.release("t/a@1") == first.lora_int_id  # the last one ended: vLLM may forget the id
    assert not snapshot.exists() and "t/a@1" not in versions.known()
    assert versions.release("t/a@2") is None  # current versions stay
    assert versions.retire("t/a@2") == second.lora_int_id  # retired with nothing running: at once
    assert versions.retire("never-requested") is None
    versions.close()


def test_a_deleted_version_cannot_be_acquired(tmp_path: Path) -> None:
    versions = LoraVersions({})
    with pytest.raises(FileNotFoundError):
        versions.acquire("t/gone@1", tmp_path / "gone")
    with pytest.raises(KeyError):
        versions.acquire("not-a-start-up-adapter", None)
    assert versions.known() == []
    versions.close()
