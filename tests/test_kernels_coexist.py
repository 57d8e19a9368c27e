"""bitsandbytes imports a top-level package named `kernels` (Hugging Face's) on CPUs with AVX-512 bf16; ours is
`switchboard.kernels`. With a foreign top-level `kernels` importable, both load and neither shadows the other."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from switchboard.kernels import sgmv

SCRIPT = """
import sys
import kernels                      # the foreign package, first on sys.path
import bitsandbytes                 # may import `kernels` itself
import switchboard.kernels.sgmv     # ours, under its own name
from switchboard.serving.models.quant import NF4Linear
import torch
assert kernels.__file__.startswith(sys.argv[1]), kernels.__file__
assert switchboard.kernels.sgmv.__file__ == sys.argv[2], switchboard.kernels.sgmv.__file__  # ours, as installed
layer = NF4Linear(torch.randn(64, 64), torch.float32)
print("ok", kernels.MARK, layer(torch.randn(2, 64), None, None).shape)
"""


def test_a_foreign_top_level_kernels_package_coexists_with_ours(tmp_path: Path) -> None:
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("MARK = 'foreign'\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    command = [sys.executable, "-c", SCRIPT, str(tmp_path), sgmv.__file__]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "ok foreign torch.Size([2, 64])" in done.stdout
