"""The benchmarks live in bench/ alone: no other package imports one, and the CLI offers them through the
`switchboard.commands` entry point."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OTHERS = ("serving", "adapters_store", "kernels", "loadtest", "training")
COMMANDS = ("bench", "bench-serve", "bench-adapters", "bench-train", "profile")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add("." * node.level + node.module)
    return names


def test_no_other_package_imports_a_benchmark() -> None:
    offenders = []
    for package in OTHERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            bench = {n for n in _imports(path) if n.startswith("switchboard.bench") or n.split(".")[-1] == "bench"}
            offenders += [f"{path.relative_to(ROOT)}: {name}" for name in sorted(bench)]
    assert not offenders
    stray = [p.name for p in (ROOT / "serving").glob("*.py") if p.stem.startswith(("bench", "profile"))]
    assert not stray + [p.name for p in (ROOT / "kernels").glob("bench*.py")]


def test_the_cli_offers_the_benchmark_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "switchboard.serving.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in COMMANDS:
        assert command in out
    bench_help = subprocess.run(
        [sys.executable, "-m", "switchboard.serving.cli", "bench", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--num-requests" in bench_help
