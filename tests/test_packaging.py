"""Our folders are installed under `switchboard.`, and none of them can shadow another distribution's import name.

The top-level folders (serving/, kernels/, ...) have no `__init__.py`: with the repository root on sys.path
(`python -c` or `python -m pytest` run from it), a folder without one is at most a namespace portion, and Python
returns a regular package of the same name from anywhere later on the path instead. That is what keeps our
`kernels/` from hiding Hugging Face's `kernels`, which transformers 5.25 and bitsandbytes import.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("serving", "adapters_store", "kernels", "loadtest", "training", "bench")


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {f"switchboard.{top}" for top in TOP} | {
        "switchboard." + ".".join(init.parent.relative_to(ROOT).parts)
        for top in TOP
        for init in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert on_disk <= listed, f"missing from pyproject packages: {sorted(on_disk - listed)}"


def test_nothing_at_the_repository_root_is_a_regular_package_or_module() -> None:
    """By construction: no folder or file at the root can be imported ahead of an installed distribution."""
    shadowing = sorted(
        path.name
        for path in ROOT.iterdir()
        if not path.name.startswith(".")
        and ((path / "__init__.py").exists() or path.suffix in (".py", ".so", ".pyd") or path.suffix == ".pth")
    )
    assert not shadowing, f"these would shadow a distribution of the same name from the repo root: {shadowing}"


def _installed_top_level_names() -> set[str]:
    return set(importlib.metadata.packages_distributions())


def test_from_the_repository_root_every_distribution_name_resolves_to_the_installed_one() -> None:
    """Run from the root, as `python -c` puts it first on sys.path: each of our folder names that an installed
    distribution also provides (kernels today) imports the distribution's package, not our folder."""
    clashes = sorted(set(TOP) & _installed_top_level_names())
    script = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    module = importlib.import_module(name)\n"
        "    assert module.__file__ and 'site-packages' in module.__file__, (name, module.__path__)\n"
        "print('ok', *sys.argv[1:])\n"
    )
    done = subprocess.run([sys.executable, "-c", script, *clashes], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", *clashes]


def test_transformers_bitsandbytes_and_peft_import_beside_ours_from_the_repository_root() -> None:
    script = """
import kernels, transformers, bitsandbytes, peft
from transformers.integrations import hub_kernels  # imports names from Hugging Face's kernels package
import switchboard.kernels.sgmv, switchboard.serving.cli, switchboard.training.cli, switchboard.loadtest.main
from switchboard.adapters_store import store
assert "site-packages" in kernels.__file__, kernels.__file__
assert switchboard.kernels.sgmv.__file__.startswith(sys.argv[1]), switchboard.kernels.sgmv.__file__
print("ok", transformers.__version__)
"""
    done = subprocess.run(
        [sys.executable, "-c", "import sys\n" + script, str(ROOT)], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok ")
