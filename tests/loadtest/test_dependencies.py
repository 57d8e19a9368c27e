"""The load tester is a client: it must run against any server without importing ours."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

MODULES = (
    "client",
    "compare",
    "config",
    "main",
    "peer",
    "plots",
    "report",
    "runner",
    "serve_process",
    "soak",
    "soak_cases",
    "soak_report",
    "stats",
    "upload",
    "workload",
)


def test_loadtest_never_imports_the_server(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        + "".join(f"import switchboard.loadtest.{m}\n" for m in MODULES)
        + "bad = sorted(m for m in sys.modules if m.startswith('switchboard.serving'))\n"
        + "assert not bad, bad\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-2000:]
