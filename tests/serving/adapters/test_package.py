"""serving/adapters/ is the one home of adapters at serve time: the engine reaches it only through the package's
interface, it never reaches up into the HTTP layer, and every kind has its device layout there."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from switchboard.adapters_store.kinds import AdapterKind
from switchboard.serving.adapters.layouts import Stacks, make_layouts

SERVING = Path(__file__).resolve().parents[3] / "serving"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add("." * node.level + node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_engine_uses_only_the_packages_interface() -> None:
    reached = {
        f"{path.name}: {name}"
        for path in sorted((SERVING / "engine").glob("*.py"))
        for name in _imports(path)
        if "adapters." in name.removeprefix("switchboard.serving.") and "adapters_store" not in name
    }
    assert reached == set()


def test_the_package_never_imports_the_http_layer() -> None:
    up = {
        f"{path.relative_to(SERVING)}: {name}"
        for path in sorted((SERVING / "adapters").rglob("*.py"))
        for name in _imports(path)
        if "api" in name.split(".")
    }
    assert up == set()


def test_every_kind_has_a_device_layout() -> None:
    layouts = make_layouts(Stacks(1, torch.float32, torch.device("cpu")), [], code_lora_slots=False)
    assert set(layouts) == set(AdapterKind)
    assert all(layout.kind is kind for kind, layout in layouts.items())
