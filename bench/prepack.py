"""The bf16 base products side by side on workload W in one engine, alternating rounds: F.linear (oneDNN re-packs
the weight every call), oneDNN over a weight packed once, and our AVX-512 BF16 kernel where it runs
(`python -m switchboard.bench.prepack --model DIR`); `--products` compares them on each product shape of the model
alone (alternating timed batches of calls, weights cycled through more than the caches hold, as in a step).

The engine packs its bf16 weights at start (serving/models/prepack.py); each side re-packs the same model, so all
share weights, cache and process, and the rounds alternate so that the machine's drift cancels in each pair's ratio.
Greedy tokens must be equal between F.linear and oneDNN packed (bit-identical products, checked every round); the
compiled kernel sums in another order, and its agreement with them is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch.nn.functional as F

from switchboard.kernels import cpu_linear
from switchboard.serving.config import ServeConfig
from switchboard.serving.engine.llm_engine import LLMEngine
from switchboard.serving.engine.request import SamplingParams
from switchboard.serving.models.prepack import CompiledLinear, PackedLinear, prepack_bf16

from .serve import prompts_for, stdlib_ids


def _unpack(engine: LLMEngine) -> None:
    for lin in engine.model.linears():
        del lin.base_matmul  # a registered submodule while packed
        lin.base_matmul = F.linear
    del engine.model.logits_matmul
    engine.model.logits_matmul = F.linear


def products(model_dir: Path, rows: int, pairs: int) -> list[dict]:
    """Per product shape of the model (packed q|k|v, o, gate|up, down, lm_head): each side's best time per call and
    the median of paired time ratios to F.linear. Each side cycles through copies of the weight worth 200 MB, so
    that, as in a step, the weight comes from memory rather than the caches."""
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
    compiled = cpu_linear.kernel_runs_here()  # compared wherever it runs, AMX CPUs included
    g = torch.Generator().manual_seed(0)
    out = []
    for name, (o, i) in shapes.items():
        copies = max(1, int(2e8 // (o * i * 2)))
        ws = [torch.randn(o, i, generator=g).to(torch.bfloat16) for _ in range(copies)]
        x = torch.randn(rows, i, generator=g).to(torch.bfloat16)
        packed = [PackedLinear(w, rows) for w in ws]
        sides = {
            "F.linear": lambda: [F.linear(x, w) for w in ws],  # noqa: B023
            "onednn_packed": lambda: [p(x) for p in packed],  # noqa: B023
        }
        if compiled:
            ours = [CompiledLinear(w) for w in ws]
            sides["compiled"] = lambda: [p(x) for p in ours]  # noqa: B023
        times: dict[str, list[float]] = {k: [] for k in sides}
        calls = max(1, int(4e7 // (o * i * copies)))
        for _ in range(pairs):
            for side, fn in sides.items():
                fn()
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[side].append((time.perf_counter() - t0) / (calls * copies) * 1e6)
        flops = 2 * rows * o * i
        row = {"product": f"{name} {o}x{i}", "rows": rows}
        cells = []
        for side, ts in times.items():
            ratio = statistics.median(a / b for a, b in zip(times["F.linear"], ts, strict=True))
            row[side] = {"best_us": min(ts), "gflops": flops / min(ts) / 1e3, "ratio_to_f_linear": ratio}
            cells.append(f"{min(ts):.0f} ({flops / min(ts) / 1e3:.0f}) | {ratio:.2f}x")
        out.append(row)
        print(f"| {name} {o}x{i} | " + " | ".join(cells) + " |", flush=True)
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
    sides = ["F.linear", "onednn_packed"] + (["compiled"] if cpu_linear.kernel_runs_here() else [])
    if args.products:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
        header = " | ".join(f"{side} us, best (GFLOP/s) | vs F.linear" for side in sides)
        print(f"{uptime}\n\n| product ({args.num_requests} rows, bf16) | {header} |")
        print("|---|" + "---:|---:|" * len(sides))
        rows = products(args.model, args.num_requests, pairs=15)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"products": rows, "uptime": uptime}, indent=2))
        return
    engine = LLMEngine(ServeConfig(model=args.model, dtype="bfloat16", max_num_seqs=64))
    ids, bos = stdlib_ids(engine.tokenizer), engine.tokenizer.bos_token_id
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    runs: dict[str, list[float]] = {side: [] for side in sides}
    agreement: list[float] = []
    loads = []
    for rnd in range(args.rounds + 1):  # round 0 warms every side up and is not counted
        prompts = prompts_for(ids, bos, args.num_requests, args.prompt_len, rnd)
        tokens = {}
        for side in sides:
            _unpack(engine)
            if side != "F.linear":
                prepack_bf16(engine.model, batch_hint=32, product="compiled" if side == "compiled" else "onednn")
            t0 = time.perf_counter()
            tokens[side] = engine.generate(prompts, params)
            tok_s = sum(map(len, tokens[side])) / (time.perf_counter() - t0)
            if rnd:
                runs[side].append(tok_s)
        if tokens["onednn_packed"] != tokens["F.linear"]:
            raise AssertionError("greedy tokens differ between oneDNN packed and F.linear")
        if "compiled" in tokens:
            agreement.append(_agreement(tokens["compiled"], tokens["F.linear"]))
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
        loads.append(uptime)
        if rnd:
            print(f"round {rnd}: " + ", ".join(f"{s} {runs[s][-1]:.0f} tok/s" for s in sides) + f" ({uptime})")
    ratios = {
        side: statistics.median(a / b for a, b in zip(runs[side], runs["F.linear"], strict=True)) for side in sides
    }
    print(f"\n| base product | generated tok/s, median of {args.rounds} | vs F.linear (paired) |")
    print("|---|---:|---:|")
    for side, label in LABELS.items():
        if side in runs:
            print(f"| {label} | {statistics.median(runs[side]):.0f} | {ratios[side]:.2f}x |")
    if agreement:
        print(
            f"\ncompiled kernel: greedy tokens equal to F.linear's before the first difference, "
            f"{statistics.mean(agreement):.1%} of them (mean over rounds)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"runs": runs, "paired_ratio_to_f_linear": ratios, "compiled_agreement": agreement, "uptime": loads}
    args.out.write_text(json.dumps(result, indent=2))


LABELS = {
    "F.linear": "F.linear (oneDNN, re-packs every call)",
    "onednn_packed": "oneDNN, packed once",
    "compiled": "AVX-512 BF16 kernel, packed once",
}


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """The share of tokens that come before each pair of sequences first differs (rounding flips near-ties, and
    greedy text then goes its own way)."""
    same = total = 0
    for x, y in zip(a, b, strict=True):
        n = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
        same, total = same + n, total + len(x)
    return same / max(1, total)


if __name__ == "__main__":
    main()
