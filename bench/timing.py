"""The one timing helper of the micro-benchmarks: interleaved rounds, each function's median call, the best round."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def best_median_us(
    fns: dict[str, Callable[[], object]], device: torch.device | str = "cpu", rounds: int = 3
) -> dict[str, float]:
    """Per function, the best over `rounds` interleaved rounds of the median wall time of one call (us), each round
    at least 0.1 s and 10 calls after 3 warm-up calls: robust to other work that shares the machine for a moment.
    On a CUDA device each call is synchronised, so the time is the kernel's, not the launch's."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(3):
                fn()
            sync()
            times: list[float] = []
            start = time.perf_counter()
            while time.perf_counter() - start < 0.1 or len(times) < 10:
                t0 = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - t0)
            best[name] = min(best[name], sorted(times)[len(times) // 2] * 1e6)
    return best
