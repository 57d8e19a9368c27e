"""Packed bf16 weights against F.linear's per-call re-pack, on workload W in one engine, alternating rounds:
`python -m switchboard.bench.prepack --model DIR`; `--products` compares the two on each product shape of the model
alone (32 rows, alternating timed batches of calls), which takes minutes, not tens of them, on a busy machine.

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
from switchboard.serving.models.prepack import PackedLinear, prepack_bf16

from .serve import prompts_for, stdlib_ids


def _unpack(engine: LLMEngine) -> None:
    for lin in engine.model.linears():
        del lin.base_matmul  # a registered submodule while packed
        lin.base_matmul = F.linear
    del engine.model.logits_matmul
    engine.model.logits_matmul = F.linear


def products(model_dir: Path, rows: int, pairs: int) -> list[dict]:
    """Per product shape of the model (packed q|k|v, o, gate|up, down, lm_head): median of paired time ratios."""
    import torch

    from switchboard.serving.models.config import ModelConfig

    mc = ModelConfig.from_dir(model_dir)
    shapes = {
        "q|k|v": (mc.q_size + 2 * mc.kv_size, mc.hidden_size),
        "o_proj": (mc.hidden_size, mc.q_size),
        "gate|up": (2 * mc.intermediate_size, mc.hidden_size),
        "down_proj": (mc.hidden_size, mc.intermediate_size),
        "lm_head": (mc.vocab_size, mc.hidden_size),
    }
    g = torch.Generator().manual_seed(0)
    out = []
    for name, (o, i) in shapes.items():
        w = torch.randn(o, i, generator=g).to(torch.bfloat16)
        x = torch.randn(rows, i, generator=g).to(torch.bfloat16)
        packed = PackedLinear(w, rows)
        sides = {"F.linear": lambda: F.linear(x, w), "packed": lambda: packed(x)}  # noqa: B023
        times: dict[str, list[float]] = {k: [] for k in sides}
        calls = max(1, int(2e7 // (o * i)))
        for _ in range(pairs):
            for side, fn in sides.items():
                fn()
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[side].append((time.perf_counter() - t0) / calls * 1e6)
        ratio = statistics.median(a / b for a, b in zip(times["F.linear"], times["packed"], strict=True))
        out.append(
            {
                "product": f"{name} {o}x{i}",
                "f_linear_us": min(times["F.linear"]),
                "packed_us": min(times["packed"]),
                "ratio": ratio,
            }
        )
        print(
            f"| {name} {o}x{i} | {min(times['F.linear']):.0f} | {min(times['packed']):.0f} | {ratio:.2f}x |", flush=True
        )
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path(".cache/models/smollm2-135m"))
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench-results/prepack.json"))
    p.add_argument("--products", action="store_true", help="each product shape alone instead of W in the engine")
    args = p.parse_args(argv)
    if args.products:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
        print(
            f"{uptime}\n\n| product ({args.num_requests} rows, bf16) | F.linear us (best) | packed us (best) | ratio |"
        )
        print("|---|---:|---:|---:|")
        rows = products(args.model, args.num_requests, pairs=15)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"products": rows, "uptime": uptime}, indent=2))
        return
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
