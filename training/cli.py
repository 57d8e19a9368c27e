"""`switchboard train`: the argument parser and the command (the console script in serving/cli.py mounts it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import TrainConfig, TrainKind


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a LoRA, KronA, (IA)3 or prefix adapter on a JSONL file (PEFT format)")
    p.add_argument("--model", required=True, help="Hugging Face model directory, or 'demo'")
    p.add_argument("--kind", required=True, choices=[k.value for k in TrainKind if k is not TrainKind.FULL])
    p.add_argument("--data", type=Path, required=True, help='JSONL rows {"prompt", "completion"} or {"messages"}')
    p.add_argument("--out", type=Path, required=True, help="the adapter directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quantize", default="none", choices=["none", "nf4"], help="nf4: QLoRA-style 4-bit base")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--lr", type=float, default=None, help="default: lora 2e-3, krona 3e-2, ia3/prefix 0.1")
    p.add_argument("--scheduler", default="cosine", choices=["cosine", "linear", "constant"])
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-length", type=int, default=256, help="tokens per example (completion truncated)")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share of the rows")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha/rank)")
    p.add_argument("--rslora", action="store_true", help="LoRA scale alpha/sqrt(rank)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout; KronA module dropout")
    p.add_argument("--target-modules", type=_csv, default=None, help="comma-separated projections (LoRA, KronA, (IA)3)")
    p.add_argument("--decompose-factor", type=int, default=-1, help="KronA: rows of w1 (-1: as square as possible)")
    p.add_argument("--krona-scale", type=float, default=1.0, help="KronA: delta = scale * (w1 (x) w2)")
    p.add_argument("--feedforward-modules", type=_csv, default=("down_proj",), help="(IA)3: input-scaled targets")
    p.add_argument("--num-virtual-tokens", type=int, default=16, help="prefix length")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def config_from_args(args: argparse.Namespace, model_dir: Path) -> TrainConfig:
    return TrainConfig(
        model=model_dir,
        kind=TrainKind(args.kind),
        data=args.data,
        out=args.out,
        quantize=args.quantize,
        seed=args.seed,
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        scheduler=args.scheduler,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        eval_fraction=args.eval_fraction,
        rank=args.rank,
        alpha=args.alpha,
        use_rslora=args.rslora,
        dropout=args.dropout,
        target_modules=args.target_modules,
        decompose_factor=args.decompose_factor,
        krona_scale=args.krona_scale,
        feedforward_modules=args.feedforward_modules,
        num_virtual_tokens=args.num_virtual_tokens,
        progress=args.progress,
    )


def run_train(args: argparse.Namespace, model_dir: Path) -> None:
    from .trainer import summary, train

    result = train(config_from_args(args, model_dir), overwrite=args.overwrite)
    print(summary(result), flush=True)
