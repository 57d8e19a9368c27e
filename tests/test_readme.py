"""The README's commands, run as written: `make serve` (twice), the quick-start requests, the adapter-store and the
training examples.

Each runs in a temporary directory holding a copy of the Makefile (so `.cache/` lands there, not in the checkout),
with the suite's own virtual environment (`VENV=`, its install stamp taken as current). What the test changes in
a command is only what a test must: the port (a free one instead of 8000), the placeholders the README names
(`DIR`, `/srv/adapters`, `keys.txt`) and, for training, a step limit.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .real_model import HAVE_REAL_MODEL, REAL_MODEL, needs_real_model
from .serve_process import free_port

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
pytestmark = pytest.mark.slow


def readme_blocks(section: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block under the `## section` heading (the text before the first `##` when
    section is empty)."""
    text = (ROOT / "README.md").read_text()
    parts = re.split(r"^## ", text, flags=re.M)
    body = parts[0] if not section else next(p for p in parts[1:] if p.startswith(section))
    return re.findall(r"^```(\w*)\n(.*?)^```", body, flags=re.M | re.S)


def env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}"}


def run(command: str, cwd: Path, timeout: float = 300) -> str:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command], cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def make(target: str, cwd: Path, *args: str) -> list[str]:
    stamp = VENV / ".installed"
    return ["make", "-C", str(cwd), target, f"VENV={VENV}", "-o", str(stamp), *args]


def wait_healthy(port: int, process: subprocess.Popen, log: Path, limit_s: float = 300) -> float:
    start = time.monotonic()
    while True:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return time.monotonic() - start
        except OSError:
            assert time.monotonic() - start < limit_s, log.read_text()[-3000:]
            time.sleep(0.1)


@contextmanager
def background(argv: list[str], cwd: Path, log: Path) -> Iterator[subprocess.Popen]:
    with log.open("w") as out:
        process = subprocess.Popen(
            argv, cwd=cwd, env=env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with what `make serve` reads from the checkout: the shipped demo adapters, and the real model
    linked where the Makefile fetches it (so nothing is downloaded); the random demo model and its seeded adapters
    (the store and training sections) get built here."""
    work = tmp_path_factory.mktemp("readme")
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(ROOT / name, work / name)
    shutil.copytree(ROOT / "requirements", work / "requirements")
    shutil.copytree(ROOT / "training" / "tasks", work / "training" / "tasks")
    shutil.copytree(ROOT / "training" / "demo_adapters", work / "training" / "demo_adapters")
    if HAVE_REAL_MODEL:
        (work / ".cache" / "models").mkdir(parents=True)
        (work / ".cache" / "models" / "smollm2-135m").symlink_to(REAL_MODEL)
    built = subprocess.run(make("seeded-adapters", work), env=env(), capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    assert "switchboard demo-model --out" in built.stdout
    return work


@needs_real_model
def test_make_serve_twice_builds_nothing_and_the_second_start_is_healthy_within_15_s(workdir: Path) -> None:
    """`make serve` serves the real model (linked in by the fixture) with the shipped adapters: neither start fetches
    or builds anything."""
    for start in ("first", "second"):
        port = free_port()
        with background(make("serve", workdir, f"PORT={port}"), workdir, workdir / f"{start}.log") as server:
            seconds = wait_healthy(port, server, workdir / f"{start}.log")
            log = (workdir / f"{start}.log").read_text()
            assert "fetch-model" not in log and "demo-adapters" not in log, log
            assert "adapter demo-prefix (prefix) from training/demo_adapters/smollm2-135m/demo-prefix" in log, log
            if start == "second":
                assert seconds < 15, f"the second `make serve` took {seconds:.1f} s to be healthy"
                quick_start(workdir, port)


def quick_start(workdir: Path, port: int) -> None:
    """Every request of the README's first section against `make serve`'s server: the curl lines and the Python
    client blocks, in order, as one script (later blocks use the earlier blocks' `client`)."""
    blocks = [(lang, code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")) for lang, code in readme_blocks("")]
    curls = [code for lang, code in blocks if lang == "bash" and code.startswith("curl")]
    assert len(curls) == 1
    for code in curls:
        assert '"choices"' in run(code, workdir)
    python = "\n".join(code for lang, code in blocks if lang == "python")
    assert "extra_body" in python
    done = subprocess.run([sys.executable, "-c", python], cwd=workdir, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # the replies the README prints (`# -> ...` after a print) are what the server answers
    printed = re.findall(r"^# -> (.*)$", python, flags=re.M)
    assert printed and done.stdout.splitlines() == printed, (done.stdout, printed)


def test_the_adapter_store_commands(workdir: Path) -> None:
    (block,) = [code for _, code in readme_blocks("Adapter store and tenants")]
    port = free_port()
    imports = workdir / "import-dir"
    shutil.copytree(workdir / ".cache" / "demo-adapters" / "demo-lora", imports / "x")
    (workdir / "keys.txt").write_text("KEY_A alice\n")
    lines = (
        block.replace("\\\n", " ")
        .replace("/srv/adapters", str(imports))
        .replace("DIR/", ".cache/demo-adapters/demo-lora/")
    )
    lines = lines.replace("127.0.0.1:8000", f"127.0.0.1:{port}").splitlines()
    serve, commands = lines[0], lines[1:]
    assert serve.startswith("switchboard serve ")
    with background([*serve.split(), "--port", str(port)], workdir, workdir / "store.log") as server:
        wait_healthy(port, server, workdir / "store.log")
        for command in commands:
            command = re.sub(r"^curl ", "curl -sS --fail-with-body ", command)
            if command.startswith("switchboard upload "):
                command = command.replace(" --api-key", f" --url http://127.0.0.1:{port} --api-key", 1)
            run(command, workdir)
    manifest = (workdir / ".cache" / "store" / "manifest.json").read_text()
    assert '"x"' in manifest and '"my-lora"' not in manifest  # loaded by load_lora_adapter; my-lora deleted


def test_the_training_commands(workdir: Path) -> None:
    (block,) = [code for _, code in readme_blocks("Training adapters")]
    train, serve = [line.split("#")[0].strip() for line in block.splitlines() if "..." not in line]
    run(train + " --max-steps 2", workdir)
    port = free_port()
    with background([*serve.split(), "--port", str(port)], workdir, workdir / "train.log") as server:
        wait_healthy(port, server, workdir / "train.log")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
            assert b'"lookup"' in r.read()
