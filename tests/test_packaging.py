"""Every sub-package folder is installed under `switchboard.`, and no top-level `kernels` package is created."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("serving", "adapters_store", "kernels", "loadtest", "training")


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        "switchboard." + ".".join(init.parent.relative_to(ROOT).parts)
        for top in TOP
        for init in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert on_disk <= listed, f"missing from pyproject packages: {sorted(on_disk - listed)}"


def test_no_top_level_kernels_package_of_ours() -> None:
    spec = importlib.util.find_spec("kernels")
    assert spec is None or ROOT not in Path(spec.origin or "").parents
    assert importlib.util.find_spec("switchboard.kernels") is not None
