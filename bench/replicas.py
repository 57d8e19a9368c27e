"""`switchboard bench-replicas`: `switchboard loadtest` against one process, then 1, 2, ... replicas on Ray Serve.

Each server starts fresh on its own store; the load test uploads --num-adapters LoRA adapters through it and sends
Zipf-popular requests among them. Printed per server: throughput, TTFT, and the affinity hit rate (the share of
adapter requests whose replica already held the adapter's key, from the replicas' `replica_adapter_requests_total`).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from switchboard.loadtest.serve_process import ServeProcess

STARTUP_TIMEOUT_S = 600


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-replicas", help="loadtest one process and 1..N Ray Serve replicas (prints a table)")
    p.add_argument("--model", default="demo")
    p.add_argument("--replicas", default="0,1,2", help="comma-separated; 0 is one process without Ray")
    p.add_argument("--num-adapters", type=int, default=64)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--rate", type=float, default=4.0)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--prompt-len", default="64")
    p.add_argument("--output-len", default="32")
    p.add_argument("--num-threads", type=int, default=1, help="torch threads per replica (and of the one process)")
    p.add_argument("--serve-args", default="", help="more `switchboard serve` flags, space-separated")
    p.add_argument("--out", type=Path, default=Path("bench-results/replicas"))


def run_bench_replicas(args: argparse.Namespace, model: Path) -> None:
    rows = []
    for n in [int(x) for x in args.replicas.split(",") if x]:
        rows.append(_one(args, model, n))
        _print_table(args, rows)
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("func", "command")}
    (args.out / "table.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")


def _one(args: argparse.Namespace, model: Path, replicas: int) -> dict[str, object]:
    label = "one process" if replicas == 0 else f"{replicas} replica{'s' if replicas > 1 else ''}"
    out = args.out / ("process" if replicas == 0 else f"replicas-{replicas}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    store = Path(tempfile.mkdtemp(prefix="switchboard-bench-store-"))
    flags = ["--num-threads", str(args.num_threads), *args.serve_args.split()]
    if replicas:
        flags += ["--replicas", str(replicas)]
    server = ServeProcess(out, model, *flags, store=store, startup_timeout_s=STARTUP_TIMEOUT_S)
    try:
        url = server.url
        before = _affinity(url)
        switchboard = str(Path(sys.executable).with_name("switchboard"))
        loadtest = [switchboard, "loadtest", "--url", url, "--num-adapters", str(args.num_adapters)]
        loadtest += ["--upload-model", str(model), "--zipf", str(args.zipf), "--rate", str(args.rate)]
        loadtest += ["--duration", str(args.duration), "--prompt-len", args.prompt_len]
        loadtest += ["--output-len", args.output_len, "--no-progress", "--out", str(out)]
        subprocess.run(loadtest, check=True)
        after = _affinity(url)
    finally:
        server.stop(timeout_s=120)
        shutil.rmtree(store, ignore_errors=True)
    summary = json.loads((out / "results.json").read_text())["summary"]
    hits, loads = after[0] - before[0], after[1] - before[1]
    return {
        "server": label,
        "completed": summary["completed"],
        "errors": summary["errors"],
        "req_s": summary["request_throughput"],
        "tok_s": summary["output_token_throughput"],
        "ttft_p50": summary["ttft_ms"]["p50"],
        "ttft_p99": summary["ttft_ms"]["p99"],
        "tpot_p50": summary["tpot_ms"]["p50"],
        "hit_rate": None if hits + loads == 0 else hits / (hits + loads),
        "loads": loads,
    }


def _affinity(url: str) -> tuple[float, float]:
    """(hits, loads) summed over the replicas; (0, 0) from one process, which has no such series."""
    text = httpx.get(f"{url}/metrics", timeout=60).text
    found = re.findall(r'switchboard_replica_adapter_requests_total\{replica="\w+",result="(\w+)"\} ([0-9.e+]+)', text)
    hits = sum(float(v) for result, v in found if result == "hit")
    return hits, sum(float(v) for result, v in found if result == "load")


def _print_table(args: argparse.Namespace, rows: list[dict[str, object]]) -> None:
    print(
        f"\n{args.num_adapters} LoRA adapters, Zipf {args.zipf}, Poisson {args.rate} req/s for {args.duration} s, "
        f"prompt {args.prompt_len} / output {args.output_len} tokens, {args.num_threads} thread(s) per engine\n"
    )
    print("| server | completed | errors | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | hit rate |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        rate = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.1%} ({r['loads']:.0f} loads)"
        print(
            f"| {r['server']} | {r['completed']} | {r['errors']} | {r['req_s']:.2f} | {r['tok_s']:.1f} | "
            f"{r['ttft_p50']:.0f} | {r['ttft_p99']:.0f} | {r['tpot_p50']:.1f} | {rate} |",
            flush=True,
        )
