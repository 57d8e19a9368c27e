"""The engine core process against the engine thread: generated tokens/s on one workload, in process (the engine's
own `generate`, as `switchboard bench` runs it) and over HTTP to `switchboard serve --engine-process on` and `off`,
the same streaming client for both servers, in alternating rounds so that the machine's drift falls on all three.

    python -m switchboard.bench.engine_process --model .cache/models/smollm2-135m --rounds 3

Workload (issue 16's W by default): `--num-requests` concurrent requests of `--prompt-len` prompt tokens and
`--max-tokens` new tokens, greedy, EOS ignored. Prints a table with each figure's ratio to in-process and `uptime`
before and after, and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from switchboard.bench.adapters import _bodies, _load
from switchboard.bench.engine import make_prompts
from switchboard.loadtest.serve_process import ServeProcess
from switchboard.serving.cli import model_dir
from switchboard.serving.config import ServeConfig
from switchboard.serving.engine.llm_engine import LLMEngine, load_tokenizer
from switchboard.serving.engine.request import SamplingParams

MODES = ("in process", "HTTP, engine process", "HTTP, engine thread")


def _uptime() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"load average: {load}"


def run(args: argparse.Namespace) -> dict:
    model = model_dir(args.model).resolve()  # the servers run in their own working directories
    tok = load_tokenizer(model)
    prompts = make_prompts(tok, args.num_requests, args.prompt_len)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    print(f"[bench] before: {_uptime()}", flush=True)
    engine = LLMEngine(ServeConfig(model=model, dtype=args.dtype, max_num_seqs=max(64, args.num_requests)))
    engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # warm-up

    def in_process() -> float:
        """From a second thread, as both servers step: on a crowded machine steps from the main thread measured
        several times slower (serving/engine/core.py)."""
        result: list[float] = []

        def run() -> None:
            start = time.perf_counter()
            tokens = sum(len(o) for o in engine.generate(prompts, params))
            result.append(tokens / (time.perf_counter() - start))

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        return result[0]

    flags = ["--dtype", args.dtype, "--max-num-seqs", str(max(64, args.num_requests)), "--log-level", "warning"]
    runs: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        work = {mode: Path(tmp) / str(i) for i, mode in enumerate(MODES[1:])}
        for path in work.values():
            path.mkdir()
        on = ServeProcess(work[MODES[1]], model, *flags, "--engine-process", "on", startup_timeout_s=900)
        off = ServeProcess(work[MODES[2]], model, *flags, "--engine-process", "off", startup_timeout_s=900)
        try:
            name = model.resolve().name
            bodies = _bodies([name] * len(prompts), prompts, args.max_tokens)
            servers = {MODES[1]: on.url, MODES[2]: off.url}
            for url in servers.values():  # warm-up: the batch shapes, the connection pools
                asyncio.run(_load(url, _bodies([name] * len(prompts), prompts, 8), args.num_requests))
            for r in range(args.rounds):
                runs[MODES[0]].append(in_process())
                for mode, url in servers.items():
                    runs[mode].append(asyncio.run(_load(url, bodies, args.num_requests))["tokens_per_s"])
                print(f"[bench] round {r + 1}: " + ", ".join(f"{m} {v[-1]:.0f}" for m, v in runs.items()), flush=True)
        finally:
            on.stop()
            off.stop()
    after = _uptime()
    base = statistics.median(runs[MODES[0]])
    print(
        f"\nWorkload: {args.num_requests} concurrent x {args.prompt_len} prompt tokens, {args.max_tokens} new tokens, "
        f"greedy, EOS ignored; {model.name} {args.dtype}; {args.rounds} alternating rounds; after: {after}"
    )
    print("| | generated tok/s (median) | runs | vs in process |")
    print("|---|---|---|---|")
    for mode, values in runs.items():
        median = statistics.median(values)
        print(f"| {mode} | {median:.0f} | {', '.join(f'{v:.0f}' for v in values)} | {median / base:.2f}x |")
    report = {"model": str(model), "dtype": args.dtype, "runs": runs, "load_after": after, "args": vars(args)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nJSON: {args.out}")
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench-results/engine_process.json"))
    run(p.parse_args())


if __name__ == "__main__":
    main()
