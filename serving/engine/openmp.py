"""One OpenMP team per process: the step thread's.

GNU OpenMP (libgomp, which torch's Linux wheels bundle and run their CPU kernels on) keeps a pool of worker threads
for every thread that has opened a parallel region, and counts the workers of all pools together. Once they outnumber
the CPUs it throttles every worker: at the end of each region a worker spins 100 times (not about 300,000) and then
sleeps on a futex, so the next region waits for it to wake. A step opens several hundred regions (every product and
element-wise op of every layer). The server loads the model in its main thread (one pool) and steps in the engine
thread (a second pool): on 2 cores W ran at 0.90x of the loading thread's speed with the loader's pool alive, 1.01x
with it released (455 and 506 generated tok/s; `python -m switchboard.bench.openmp_pools`).

So the thread that built the engine releases its pool before the step thread starts (`release_pool`), and the
server's other threads that may touch torch (request parsing, adapter parsing, uploads) run torch on one thread
(`serial_thread`), so they never open a pool of their own. Both do nothing where torch does not run on libgomp
(Intel's OpenMP keeps one pool; macOS and Windows builds).
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

OMP_PAUSE_SOFT = 1  # omp_pause_resource_kind: free the threads, keep the settings


def _loaded(*names: str) -> set[str]:
    """Paths of the shared libraries this process has mapped whose file names start with one of `names`."""
    with open("/proc/self/maps") as maps:
        paths = {line.rsplit(" ", 1)[-1].strip() for line in maps}
    return {p for p in paths if p.rsplit("/", 1)[-1].startswith(names)}


@functools.cache
def libgomp() -> ctypes.CDLL | None:
    """The libgomp this process has loaded for torch, or None when torch runs on another OpenMP (or none)."""
    if sys.platform != "linux" or not torch.backends.openmp.is_available():
        return None
    paths = _loaded("libgomp", "libiomp")
    gnu = [p for p in paths if "/libgomp" in p]
    if len(gnu) != 1 or len(paths) != 1:  # Intel's runtime, or two runtimes: not the pools this module knows
        return None
    lib = ctypes.CDLL(gnu[0])  # the loaded library: dlopen hands back the same handle
    if not hasattr(lib, "omp_pause_resource_all"):  # before GCC 9
        return None
    return lib


@functools.cache
def _mkl_set_local() -> Callable[[int], int] | None:
    """MKL's per-thread thread count (torch links MKL into libtorch_cpu): MKL's products take their thread count
    from MKL's setting, not the thread's OpenMP one."""
    for path in _loaded("libtorch_cpu"):
        fn = getattr(ctypes.CDLL(path), "MKL_Set_Num_Threads_Local", None)  # the C entry point (mkl_service.h)
        if fn is not None:
            return fn
    return None


def release_pool() -> bool:
    """Free the calling thread's OpenMP workers (they no longer count against the step thread's); a later parallel
    region on this thread would start them again. False where there is no libgomp to ask."""
    lib = libgomp()
    if lib is None:
        return False
    return lib.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0


def serial_pool(thread_name_prefix: str, max_workers: int | None = 1) -> ThreadPoolExecutor:
    """A thread pool for work beside the step thread: each of its threads runs torch alone (`serial_thread`)."""
    return ThreadPoolExecutor(max_workers, thread_name_prefix, serial_thread)


def serial_thread() -> None:
    """From now on torch runs on the calling thread alone, so this thread never opens an OpenMP pool. For threads
    that do small torch work beside the step thread (an executor's `initializer`)."""
    lib = libgomp()
    if lib is None:
        return
    # torch sets a thread's OpenMP thread count on its first parallel use (to torch.get_num_threads()); this call
    # makes that happen now, so the count set below is not overwritten later. The count is the thread's own.
    torch.get_num_threads()
    lib.omp_set_num_threads(1)
    mkl = _mkl_set_local()
    if mkl is not None:
        mkl(1)
