"""Peak memory of a training run: the CUDA allocator's peak, or on the CPU the process's peak resident set."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or Linux's VmHWM (writing 5 to clear_refs resets it)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # not Linux, or not permitted: the peak then covers the whole process
        _CLEAR_REFS.write_text("5")


def current_bytes(device: torch.device) -> int:
    """What the peak starts from: CUDA's allocated bytes, or the process's resident set (VmRSS)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return _status_kib("VmRSS:") * 1024


def _status_kib(field: str) -> int:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if kib := _status_kib("VmHWM:"):
        return kib * 1024
    import resource  # not Linux: the process's lifetime peak

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
