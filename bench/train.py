"""`switchboard bench-train`: training cost per adapter kind beside full fine-tuning of the same model on the same
data (in the style of S2's Table 5: trainable parameters, peak memory, throughput as % of full fine-tuning), and
serving throughput on an NF4 base as a ratio to the bf16 base, all measured in one run of this process.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from switchboard.adapters_store.kinds.base import ALL_LINEAR
from switchboard.serving.config import ServeConfig
from switchboard.serving.engine.llm_engine import LLMEngine, load_tokenizer
from switchboard.serving.engine.request import SamplingParams
from switchboard.training.config import TrainConfig
from switchboard.training.trainer import train

from .engine import make_prompts

# (label, kind, quantize, extra TrainConfig fields): the kinds with the trainer's defaults, QLoRA, full fine-tuning
ROWS: list[tuple[str, str, str, dict[str, object]]] = [
    ("full fine-tuning", "full", "none", {}),
    ("LoRA r=8, all linears", "lora", "none", {}),
    ("LoRA r=8, q and v", "lora", "none", {"target_modules": ("q_proj", "v_proj")}),
    ("KronA, attention", "krona", "none", {}),
    ("KronA, all linears", "krona", "none", {"target_modules": ALL_LINEAR}),
    ("(IA)3, k v down", "ia3", "none", {}),
    ("prefix, 16 tokens", "prefix", "none", {}),
    ("QLoRA: LoRA r=8 on NF4", "lora", "nf4", {}),
    ("prefix on NF4", "prefix", "nf4", {}),
]


def bench_training(model_dir: Path, args: argparse.Namespace) -> list[dict[str, object]]:
    rows = []
    for label, kind, quantize, extra in ROWS:
        gc.collect()
        print(f"[bench-train] {label} ...", flush=True)
        cfg = TrainConfig(
            model=model_dir,
            kind=kind,
            data=args.data,
            out=None,
            quantize=quantize,
            epochs=1000,
            max_steps=args.steps,
            batch_size=args.batch_size,
            progress=False,
            **extra,
        )
        log = train(cfg).log
        evals = log["eval"]
        rows.append(
            {
                "method": label,
                "kind": kind,
                "quantize": quantize,
                "trainable_parameters": log["trainable_parameters"],
                "trainable_percent": log["trainable_percent"],
                "peak_memory_bytes": log["peak_memory_bytes"],
                "peak_memory_over_start_bytes": log["peak_memory_over_start_bytes"],
                "tokens_per_second": log["tokens_per_second"],
                "eval_loss_start": evals[0]["loss"],
                "eval_loss_end": evals[-1]["loss"],
            }
        )
    full = rows[0]["tokens_per_second"]
    for row in rows:
        row["throughput_percent_of_full"] = 100.0 * (row["tokens_per_second"] / full)  # x / x is exactly 1
    return rows


def bench_serving(model_dir: Path, args: argparse.Namespace) -> dict[str, object]:
    """Generated tokens/s of the base in bf16, NF4 (auto: packed kernel where shapes allow) and NF4 dequantising,
    in paired rounds (one run of each per round), so that the machine's drift cancels in each round's ratios."""
    configs = {
        "bf16": {"quantize": "none"},
        "nf4": {"quantize": "nf4", "nf4_path": "auto"},
        "nf4-dequantize": {"quantize": "nf4", "nf4_path": "dequantize"},
    }
    prompts = make_prompts(load_tokenizer(model_dir), args.num_requests, args.prompt_len)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    engines = {}
    for name, kw in configs.items():
        engine = LLMEngine(ServeConfig(model=model_dir, dtype="bfloat16", max_num_seqs=args.num_requests, **kw))
        engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # warm-up
        engines[name] = engine
    runs: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            t0 = time.perf_counter()
            n = sum(len(o) for o in engine.generate(prompts, params))
            runs[name].append(n / (time.perf_counter() - t0))
    out: dict[str, object] = {}
    for name, engine in engines.items():
        ratios = [r / b for r, b in zip(runs[name], runs["bf16"], strict=True)]
        out[name] = {
            "tokens_per_second": statistics.median(runs[name]),
            "runs": runs[name],
            "ratio_to_bf16_paired": statistics.median(ratios),
            "base_weight_bytes": engine.base_weight_bytes,
        }
    return out


def plot(report: dict, path: Path) -> None:
    """Three panels: trainable share of the model, the run's own memory, and throughput as % of full fine-tuning."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    rows = report["training"]["rows"]
    labels = [r["method"] for r in rows]
    panels = [
        ("trainable parameters (% of model, log)", [r["trainable_percent"] for r in rows], True),
        ("peak memory above start (MiB)", [r["peak_memory_over_start_bytes"] / 2**20 for r in rows], False),
        ("training throughput (% of full fine-tuning)", [r["throughput_percent_of_full"] for r in rows], False),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for ax, (title, values, log) in zip(axes, panels, strict=True):
        ax.barh(labels, values, color=["#888"] + ["#3b7dd8"] * (len(values) - 1))
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_xscale("log")
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()
    serving = report["serving"]["results"]
    ratios = ", ".join(f"{k} {v['ratio_to_bf16_paired']:.2f}" for k, v in serving.items())
    fig.suptitle(
        f"{report['model']}: PEFT kinds beside full fine-tuning; serving tokens/s vs bf16: {ratios}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_bench_train(args: argparse.Namespace, model_dir: Path) -> dict[str, object]:
    training = bench_training(model_dir, args)
    print(f"[bench-train] serving: bf16 and NF4 bases, {args.repeats} paired rounds ...", flush=True)
    serving = bench_serving(model_dir, args)
    threads = torch.get_num_threads()
    print(
        f"\nTraining: {args.steps} steps of {args.batch_size} rows of {args.data.name}; model {model_dir}; "
        f"{threads} threads; {platform.processor()}"
    )
    print(
        "| method | trainable params | % of model | peak RSS MiB | above start MiB | train tokens/s | % of full FT "
        "| held-out loss |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in training:
        print(
            f"| {r['method']} | {r['trainable_parameters']:,} | {r['trainable_percent']:.3f} | "
            f"{r['peak_memory_bytes'] / 2**20:.0f} | {r['peak_memory_over_start_bytes'] / 2**20:.0f} | "
            f"{r['tokens_per_second']:.0f} | "
            f"{r['throughput_percent_of_full']:.1f} | {r['eval_loss_start']:.2f} -> {r['eval_loss_end']:.2f} |"
        )
    workload = f"{args.num_requests} requests x {args.prompt_len} prompt tokens, {args.max_tokens} new tokens, greedy"
    print(f"\nServing the base: {workload}; bf16 activations")
    print("| base | linear weights MiB | total weights MiB | generated tokens/s | ratio to bf16 (paired) |")
    print("|---|---|---|---|---|")
    for name, r in serving.items():
        b = r["base_weight_bytes"]
        print(
            f"| {name} | {b['linear'] / 2**20:.1f} | {b['total'] / 2**20:.1f} | {r['tokens_per_second']:.0f} | "
            f"{r['ratio_to_bf16_paired']:.2f} |"
        )
    report = {
        "model": str(model_dir),
        "threads": threads,
        "training": {"data": str(args.data), "steps": args.steps, "batch_size": args.batch_size, "rows": training},
        "serving": {"workload": workload, "results": serving},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(report, args.out.with_suffix(".png"))
    print(f"\nJSON: {args.out}; plot: {args.out.with_suffix('.png')}")
    return report
