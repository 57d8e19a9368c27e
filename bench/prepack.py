"""Packed bf16 weights against F.linear's per-call re-pack, on workload W in one engine, alternating rounds:
`python -m switchboard.bench.prepack --model DIR`.

The engine packs its bf16 weights at start (serving/models/prepack.py); the other side of each pair puts F.linear
back on the same model, so both sides share weights, cache and process, and the rounds alternate so that the shared
machine's drift cancels in each pair's ratio. Greedy tokens must be equal on both sides (checked every round).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch.nn.functional as F

from switchboard.serving.config import ServeConfig
from switchboard.serving.engine.llm_engine import LLMEngine
from switchboard.serving.engine.request import SamplingParams
from switchboard.serving.models.prepack import prepack_bf16

from .serve import prompts_for, stdlib_ids


def _unpack(engine: LLMEngine) -> None:
    for lin in engine.model.linears():
        del lin.base_matmul  # a registered submodule while packed
        lin.base_matmul = F.linear
    del engine.model.logits_matmul
    engine.model.logits_matmul = F.linear


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path(".cache/models/smollm2-135m"))
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench-results/prepack.json"))
    args = p.parse_args(argv)
    engine = LLMEngine(ServeConfig(model=args.model, dtype="bfloat16", max_num_seqs=64))
    ids, bos = stdlib_ids(engine.tokenizer), engine.tokenizer.bos_token_id
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    runs: dict[str, list[float]] = {"packed": [], "F.linear": []}
    loads = []
    for rnd in range(args.rounds + 1):  # round 0 warms both sides up and is not counted
        prompts = prompts_for(ids, bos, args.num_requests, args.prompt_len, rnd)
        tokens = {}
        for side in ("packed", "F.linear"):
            if side == "packed":
                prepack_bf16(engine.model, batch_hint=32)
            else:
                _unpack(engine)
            t0 = time.perf_counter()
            tokens[side] = engine.generate(prompts, params)
            tok_s = sum(map(len, tokens[side])) / (time.perf_counter() - t0)
            if rnd:
                runs[side].append(tok_s)
        if tokens["packed"] != tokens["F.linear"]:
            raise AssertionError("greedy tokens differ between packed and F.linear")
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
        loads.append(uptime)
        if rnd:
            print(f"round {rnd}: packed {runs['packed'][-1]:.0f} tok/s, F.linear {runs['F.linear'][-1]:.0f} ({uptime})")
    ratio = statistics.median(a / b for a, b in zip(runs["packed"], runs["F.linear"], strict=True))
    print(f"\n| base product | generated tok/s, median of {args.rounds} | |")
    print("|---|---:|---:|")
    print(f"| F.linear (re-packs every call) | {statistics.median(runs['F.linear']):.0f} | 1.00x |")
    print(f"| packed once | {statistics.median(runs['packed']):.0f} | {ratio:.2f}x (paired) |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": runs, "paired_ratio": ratio, "uptime": loads}, indent=2))


if __name__ == "__main__":
    main()
