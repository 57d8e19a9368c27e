"""`switchboard serve --adapter NAME=DIR` validates start-up adapters as served, as uploads are: an adapter whose
folded scale or vector is out of bounds stops the server before it listens, with the reason."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from switchboard.adapters_store.kinds.base import CONFIG_FILE, WEIGHTS_FILE

from ...serve_process import free_port
from .adapter_files import huge_ia3_files


def _huge_lora(source: Path, out: Path) -> Path:
    shutil.copytree(source, out)
    config = json.loads((out / CONFIG_FILE).read_text())
    (out / CONFIG_FILE).write_text(json.dumps({**config, "lora_alpha": 1e300}))
    return out


def _huge_ia3(source: Path, out: Path) -> Path:
    out.mkdir()
    for name, data in huge_ia3_files(source).items():
        (out / name).write_bytes(data)
    return out


@pytest.mark.parametrize(
    ("kind", "make", "expected"),
    [
        ("lora", _huge_lora, "lora_B.weight' times the scale 1.25e+299 reaches |value| inf"),
        ("ia3", _huge_ia3, "k_proj.ia3_l' reaches |value| 3e+38"),
    ],
)
def test_serve_refuses_an_adapter_out_of_bounds(
    kind: str, make, expected: str, tiny_model_dir: Path, peft_adapters: dict[str, Path], tmp_path: Path
) -> None:
    adapter = make(peft_adapters[kind], tmp_path / "bad")
    cmd = [str(Path(sys.executable).with_name("switchboard")), "serve", "--model", str(tiny_model_dir)]
    cmd += ["--store", str(tmp_path / "store"), "--port", str(free_port()), "--adapter", f"bad={adapter}"]
    # Two processes start (the server and its engine core, each importing torch): minutes on a crowded machine.
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{WEIGHTS_FILE}: " in done.stderr and expected in done.stderr, done.stderr
