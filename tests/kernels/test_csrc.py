"""The C++ of the CPU kernels lives in kernels/csrc/ as real files: formatted by clang-format, compiled here with the
flags the server builds with plus -Wall -Wextra -Werror, shipped as package data, and no Python file holds C++."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

from switchboard.kernels import cpp_build

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "kernels" / "csrc"
SOURCES = sorted(CSRC.glob("*.cpp"))
PACKAGES = ["serving", "adapters_store", "kernels", "loadtest", "training"]
CPP_LINE = re.compile(r"^\s*(#include\s*[<\"]|TORCH_LIBRARY\w*\()", re.MULTILINE)


def test_the_sources_are_there_and_read_as_package_data() -> None:
    assert [p.stem for p in SOURCES] == ["cpu_adapters", "cpu_linear", "cpu_step", "paged_attention"]
    for path in SOURCES:
        assert cpp_build.read_source(path.stem) == path.read_text()
    assert cpp_build.shared_headers() == {p.name: p.read_text() for p in CSRC.glob("*.h")}


def test_the_headers_are_part_of_the_build_key(tmp_path: Path) -> None:
    source = '#include "switchboard_cpu.h"\n'
    first = cpp_build.compile_job("k", source, [], tmp_path, {"switchboard_cpu.h": "// one\n"})
    second = cpp_build.compile_job("k", source, [], tmp_path, {"switchboard_cpu.h": "// two\n"})
    assert first.build_dir != second.build_dir
    assert first.headers == {"switchboard_cpu.h": "// one\n"}


def test_no_python_file_holds_cpp() -> None:
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            found = CPP_LINE.search(path.read_text())
            assert found is None, f"{path} holds C++: {found.group(0)!r}"


def test_clang_format_leaves_every_file_as_it_is() -> None:
    # The test extra's clang-format wheel installs its binary beside this interpreter, which need not be on PATH.
    clang_format = shutil.which("clang-format", path=str(Path(sys.executable).parent)) or shutil.which("clang-format")
    assert clang_format, "clang-format (the test extra's clang-format wheel) is not installed"
    files = [str(p) for p in [*SOURCES, *sorted(CSRC.glob("*.h"))]]
    result = subprocess.run(
        [clang_format, "--dry-run", "--Werror", f"--style=file:{CSRC / '.clang-format'}", *files],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def _compile(source: Path, out: Path, cflags: list[str]) -> subprocess.CompletedProcess:
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler here (the server then runs its torch paths)")
    torch_includes = [arg for path in include_paths() for arg in ("-isystem", path)]
    command = [
        cxx, "-std=c++20", "-fPIC", *cflags, "-Wall", "-Wextra", "-Werror", *torch_includes,
        "-c", str(source), "-o", str(out),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True)


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_compiles_without_a_warning(source: Path, tmp_path: Path) -> None:
    result = _compile(source, tmp_path / f"{source.stem}.o", cpp_build.CFLAGS)
    assert result.returncode == 0, result.stderr[-4000:]


# The sources with an AVX-512 path, compiled for a CPU without AVX-512 (x86-64-v3: AVX2), as -march=native does on
# one: the other branch must build, and build clean, too.
AVX512_SOURCES = [p for p in SOURCES if "__AVX512" in p.read_text()]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="an x86-64 target")
@pytest.mark.parametrize("source", AVX512_SOURCES, ids=[p.stem for p in AVX512_SOURCES])
def test_compiles_without_avx512(source: Path, tmp_path: Path) -> None:
    cflags = ["-march=x86-64-v3" if flag == "-march=native" else flag for flag in cpp_build.CFLAGS]
    assert cflags != cpp_build.CFLAGS
    result = _compile(source, tmp_path / f"{source.stem}.o", cflags)
    assert result.returncode == 0, result.stderr[-4000:]
