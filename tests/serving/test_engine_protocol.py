"""Every engine behind the API (`serving/backends.py`) has every member of the API's `Engine` protocol.

Read from the sources, not by importing them: the vLLM backend's module imports vLLM, which only `make test-vllm`'s
venv has, and its server lacking `is_alive` (added to the protocol with the engine core process) went unnoticed
until that suite ran.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from switchboard.serving.api.app import Engine

SERVING = Path(inspect.getfile(Engine)).parents[1]
ENGINES = {
    "AsyncEngine": SERVING / "engine" / "async_engine.py",
    "EngineCoreClient": SERVING / "engine" / "core_client.py",
    "VllmEngine": SERVING / "vllm_backend" / "engine.py",
}


def protocol_members() -> set[str]:
    names = {n for n in vars(Engine) if not n.startswith("_")}
    return names | set(Engine.__annotations__)


def class_members(path: Path, name: str) -> set[str]:
    """Names a class defines: methods, properties, class attributes, and attributes its methods assign on self."""
    tree = ast.parse(path.read_text())
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name)
    members: set[str] = set()
    for node in cls.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            members.add(node.name)
        elif isinstance(node, ast.Assign):
            members |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            members.add(node.target.id)
    for node in ast.walk(cls):
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                members.add(t.attr)
    return members


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_every_engine_has_the_protocols_members(name: str) -> None:
    missing = protocol_members() - class_members(ENGINES[name], name)
    assert not missing, f"{name} lacks {sorted(missing)} of the API's Engine protocol"
