"""One OpenMP team per server process (serving/engine/openmp.py): the loader's workers are released when the step
thread starts, and helper threads never start workers of their own.

Each check runs in a fresh interpreter, where the process's threads are known: libgomp's workers show as threads in
/proc/self/task. Two threads of torch are forced, as on the 2-core machines the throttling was measured on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from switchboard.serving.engine import openmp

pytestmark = pytest.mark.skipif(openmp.libgomp() is None, reason="torch does not run on GNU OpenMP here")

PRELUDE = """
import json, os, sys, threading
import torch
from switchboard.serving.engine import openmp
torch.set_num_threads(2)
def tids():
    return set(os.listdir("/proc/self/task"))
def parallel_work():
    x = torch.randn(4_000_000)
    (x * 2).sum()  # an element-wise op big enough for torch's parallel_for
    torch.randn(512, 512) @ torch.randn(512, 512)  # MKL's sgemm, which keeps its own thread count
    a, w = torch.randn(64, 576, dtype=torch.bfloat16), torch.randn(1536, 576, dtype=torch.bfloat16)
    torch.nn.functional.linear(a, w)  # oneDNN
"""


def _run(body: str, *args: str) -> dict:
    script = PRELUDE + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_release_pool_ends_the_calling_threads_workers() -> None:
    r = _run("""
        before = tids()
        parallel_work()
        workers = tids() - before
        released = openmp.release_pool()
        print(json.dumps({"workers": len(workers), "released": released, "left": len(workers & tids())}))
    """)
    assert r["workers"] == 1  # two threads of torch: the caller and one worker
    assert r["released"] is True
    assert r["left"] == 0


def test_a_serial_thread_starts_no_workers_and_others_keep_theirs() -> None:
    r = _run("""
        seen = {}
        def helper():
            openmp.serial_thread()
            before = tids()
            parallel_work()
            seen["new"] = len(tids() - before)
            seen["threads"] = torch.get_num_threads()
        t = threading.Thread(target=helper)
        t.start(); t.join()
        before = tids()
        parallel_work()
        print(json.dumps({**seen, "main_new": len(tids() - before), "main_threads": torch.get_num_threads()}))
    """)
    assert r == {"new": 0, "threads": 1, "main_new": 1, "main_threads": 2}


def test_starting_the_async_engine_releases_the_loaders_workers(tiny_model_dir: Path) -> None:
    """The engine is built (and its loader's pool started) on one thread, stepped on another: once the step thread
    runs, the loader's worker is gone, and the engine answers."""
    r = _run(
        """
        import asyncio
        from switchboard.serving.config import ServeConfig
        from switchboard.serving.engine.async_engine import AsyncEngine
        from switchboard.serving.engine.request import SamplingParams
        before = tids()
        engine = AsyncEngine(ServeConfig(model=sys.argv[1], max_num_seqs=4))
        parallel_work()
        workers = tids() - before - {str(threading.get_native_id())}
        async def main():
            engine.start()
            left = len(workers & tids())
            params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
            tokens = [t async for out in engine.generate("r", [1, 2, 3], params) for t in out.new_token_ids]
            engine.shutdown()
            return left, len(tokens)
        left, tokens = asyncio.run(main())
        print(json.dumps({"loader_workers": len(workers), "left": left, "tokens": tokens}))
        """,
        str(tiny_model_dir),
    )
    assert r["loader_workers"] >= 1
    assert r["left"] == 0
    assert r["tokens"] == 4
