"""`python -m switchboard.bench.stream` runs end to end on small shapes and prints one row per measurement
(the figures themselves are for people, not asserted)."""

from __future__ import annotations

import re

import pytest
import torch

from switchboard.bench import stream as bench_stream
from switchboard.kernels import cpu_adapters


@pytest.mark.skipif(not cpu_adapters.compiled_adapters_available(), reason="no C++ build here")
def test_bench_stream_prints_each_measurement(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()  # main() sets the process's thread count
    try:
        bench_stream.main(
            "--layers 2 --hidden 64 --intermediate 96 --adapters 4 --tokens 6 --all-linear --repeats 3 "
            f"--flush-mib 4 --working-set-mib 1 --threads {threads}".split()
        )
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "2 layers, LoRA r=16 on all linear layers, 4 slots" in out
    assert re.search(r"1 MiB working set read just before each step: reading it again takes \d+ us", out)
    rows = re.findall(
        r"^  (.+?)\s+([\d.]+) ms per step\s+([\d.]+) GB/s .* again after it:\s+(\d+) us$", out, flags=re.M
    )
    coded = ["LoRA op, 4 distinct, coded slots"] if cpu_adapters.coded_slots_pay() else []
    assert [name for name, _, _, _ in rows] == [
        "LoRA op, 4 distinct adapters",
        *coded,
        "LoRA op, one adapter for every token",
        "torch.sum over the same stacks",
    ]
    assert all(float(ms) > 0 for _, ms, _, _ in rows)


def test_make_stacks_lays_parts_out_as_the_op_expects() -> None:
    s = bench_stream.make_stacks(64, [64, 32, 32], slots=3, r=8, dtype=torch.float32)
    assert s.A.shape == (3, 64, 24) and [B.shape[2] for B in s.Bs] == [64, 32, 32]
    assert (s.cols, s.rows) == ([0, 64, 96], [0, 8, 16])
    assert s.nbytes == 4 * (3 * 64 * 24 + 3 * 8 * 128)
