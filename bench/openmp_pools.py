"""What a second OpenMP pool costs the step thread (serving/engine/openmp.py): workload W in one engine, stepped on the
thread that loaded it, on a second thread while the loader's pool lives, and on a second thread after it is released
(what the server does), alternating rounds: `python -m switchboard.bench.openmp_pools --model DIR`.

The server steps on a thread of its own, so the figure that matters is the third one against the first: released,
the step thread runs at the speed of the loading thread; kept, libgomp throttles every worker's spinning.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from switchboard.serving.config import ServeConfig
from switchboard.serving.engine import openmp
from switchboard.serving.engine.llm_engine import LLMEngine
from switchboard.serving.engine.request import SamplingParams

from .serve import prompts_for, stdlib_ids

SIDES = ("loading thread", "second thread, loader's pool kept", "second thread, loader's pool released")


def _on_thread(fn: Callable[[], list[list[int]]]) -> list[list[int]]:
    box: list[list[list[int]]] = []
    t = threading.Thread(target=lambda: box.append(fn()), name="step")
    t.start()
    t.join()
    return box[0]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path(".cache/models/smollm2-135m"))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench-results/openmp-pools.json"))
    args = p.parse_args(argv)
    if openmp.libgomp() is None:
        raise SystemExit("torch does not run on GNU OpenMP here: there is no second pool to measure")
    engine = LLMEngine(ServeConfig(model=args.model, dtype=args.dtype, max_num_seqs=64))
    ids, bos = stdlib_ids(engine.tokenizer), engine.tokenizer.bos_token_id
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    runs: dict[str, list[float]] = {side: [] for side in SIDES}
    uptimes = []
    for rnd in range(args.rounds + 1):  # round 0 warms every side up and is not counted
        tokens = {}
        for side in SIDES:
            prompts = prompts_for(ids, bos, args.num_requests, args.prompt_len, rnd * len(SIDES) + len(tokens))
            generate = lambda: engine.generate(prompts, params)  # noqa: E731, B023
            t0 = time.perf_counter()
            if side == SIDES[0]:
                out = generate()  # (re)starts this thread's pool
            elif side == SIDES[1]:
                out = _on_thread(generate)
            else:
                openmp.release_pool()
                out = _on_thread(generate)
            tokens[side] = sum(map(len, out)) / (time.perf_counter() - t0)
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
        if rnd:
            uptimes.append(uptime)
            for side, tok_s in tokens.items():
                runs[side].append(tok_s)
            print(f"round {rnd}: " + ", ".join(f"{s} {t:.0f}" for s, t in tokens.items()) + f" tok/s ({uptime})")
    base = runs[SIDES[0]]
    rows = []
    print(f"\n| stepped on | generated tok/s, median of {args.rounds} | vs the loading thread (median of pairs) |")
    print("|---|---:|---:|")
    for side, rs in runs.items():
        ratio = statistics.median(a / b for a, b in zip(rs, base, strict=True))
        rows.append({"side": side, "tok_s": rs, "median": statistics.median(rs), "paired_ratio": ratio})
        print(f"| {side} | {statistics.median(rs):.0f} | {ratio:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "uptime": uptimes, "model": str(args.model)}, indent=2))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
