"""`training` never imports `serving` (DESIGN.md: dependencies flow one way; serving is the only package that imports
everything)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
import switchboard.training.cli, switchboard.training.demo, switchboard.training.trainer, switchboard.training.tasks
leaked = sorted(m for m in sys.modules if m.startswith("switchboard.serving"))
assert not leaked, leaked
print("ok")
"""


def test_training_does_not_import_serving(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr
