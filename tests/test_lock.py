"""The committed locks (requirements/) agree with pyproject.toml, and the environment running the suite is the lock's.

`make lock` regenerates the locks; these tests say when someone edited pyproject.toml and forgot to.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKS = {"cpu": ROOT / "requirements" / "cpu.txt", "cuda": ROOT / "requirements" / "cuda.txt"}
# The platform the locks are compiled for (the Makefile's --python-version and --python-platform).
LOCK_ENV = {**default_environment(), "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
LOCK_ENV |= {"python_version": "3.11", "python_full_version": "3.11.0", "extra": "test"}
PIN = re.compile(r"^([A-Za-z0-9._-]+)==(\S+)")
DIRECT = "switchboard (pyproject.toml)"


def project_requirements(build: bool = True) -> list[Requirement]:
    """pyproject's dependencies, its test extra (and build requirements), as they apply on the locked platform."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    specs = [*data["project"]["dependencies"], *data["project"]["optional-dependencies"]["test"]]
    specs += data["build-system"]["requires"] if build else []
    reqs = [Requirement(s) for s in specs]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(LOCK_ENV)]


def read_lock(path: Path) -> tuple[dict[str, Version], set[str]]:
    """(name -> pinned version, names the lock says pyproject.toml asked for directly)."""
    pins: dict[str, Version] = {}
    direct: set[str] = set()
    last = None
    for line in path.read_text().splitlines():
        if m := PIN.match(line):
            last = canonicalize_name(m[1])
            pins[last] = Version(m[2])
        elif last and line.strip().lstrip("#").strip() in (DIRECT, f"via {DIRECT}"):
            direct.add(last)
    return pins, direct


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_every_project_requirement_is_locked_within_its_bounds(lock: str) -> None:
    pins, _ = read_lock(LOCKS[lock])
    for req in project_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is in pyproject.toml but not in {LOCKS[lock].name}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{LOCKS[lock].name} pins {name}=={pins[name]}, outside pyproject.toml's {req}: run `make lock`"
        )


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_the_lock_was_compiled_from_this_pyprojects_dependencies(lock: str) -> None:
    """Each lock names what pyproject.toml asked for when it was compiled: a dependency added or dropped since shows."""
    _, direct = read_lock(LOCKS[lock])
    asked = {canonicalize_name(r.name) for r in project_requirements(build=False)}
    assert direct, f"{LOCKS[lock].name} has no `via {DIRECT}` annotations: was it written by `make lock`?"
    assert direct == asked, (
        f"{LOCKS[lock].name} is stale: pyproject.toml added {sorted(asked - direct)}, dropped {sorted(direct - asked)};"
        " run `make lock`"
    )


def test_the_locks_hold_the_projects_torch() -> None:
    cpu, _ = read_lock(LOCKS["cpu"])
    cuda, _ = read_lock(LOCKS["cuda"])
    assert cpu["torch"] == Version("2.13.0+cpu")
    assert cuda["torch"] == Version("2.13.0")
    assert not any(name.startswith("nvidia-") for name in cpu), "the CPU lock must not pull CUDA libraries"


def test_this_environment_is_the_locks() -> None:
    """What `make install` installed is exactly what the lock says (a fresh clone gets what CI passed with)."""
    lock = LOCKS["cuda" if torch.version.cuda else "cpu"]
    pins, _ = read_lock(lock)
    wrong = {}
    for name, version in pins.items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (str(version), installed and str(installed))
    assert not wrong, f"installed packages differ from {lock.name} (locked, installed): {wrong}; run `make install`"
