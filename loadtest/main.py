"""`switchboard loadtest`: its arguments, and the run from configuration to report."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from .config import Endpoint, LengthSpec, LoadTestConfig, Popularity, PromptFormat


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    arrivals = p.add_mutually_exclusive_group(required=True)
    arrivals.add_argument("--rate", type=float, help="Poisson arrivals, requests per second")
    arrivals.add_argument("--concurrency", type=int, help="closed loop: requests kept in flight")
    p.add_argument("--num-requests", type=int, default=None, help="stop sending after this many")
    p.add_argument("--duration", type=float, default=None, help="stop sending after this many seconds")
    p.add_argument("--adapters", default=None, help="comma-separated adapter ids (sent as `model`)")
    p.add_argument("--num-adapters", type=int, default=None, help="the first N adapters /v1/models lists (or upload N)")
    p.add_argument(
        "--upload-model",
        type=Path,
        default=None,
        metavar="DIR",
        help="generate --num-adapters LoRA adapters for this base checkpoint and upload them (POST /v1/adapters)",
    )
    p.add_argument("--upload-rank", type=int, default=8)
    p.add_argument("--popularity", default=None, choices=[x.value for x in Popularity], help="default uniform")
    p.add_argument("--zipf", type=float, default=None, metavar="ALPHA", help="Zipf popularity with this exponent")
    p.add_argument("--prompt-len", default="64", help="N or LO:HI (uniform)")
    p.add_argument("--output-len", default="64", help="N or LO:HI (uniform); max_tokens")
    p.add_argument("--dataset", type=Path, default=None, help='JSONL rows {"prompt": ..., "max_tokens": ...}')
    p.add_argument("--prompt-format", default="ids", choices=[x.value for x in PromptFormat])
    p.add_argument("--token-id-range", default="10,500", help="LO,HI for random token-id prompts")
    p.add_argument("--endpoint", default="completions", choices=[x.value for x in Endpoint])
    p.add_argument("--model", default=None, help="base model name (default: from /v1/models)")
    p.add_argument("--send-adapter-id", action="store_true", help="also send Switchboard's adapter_id field")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    p.add_argument("--api-key", default=None)
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds a request may wait for the next byte")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-requests", type=int, default=0, help="sent first and not recorded")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--out", type=Path, default=Path("bench-results/loadtest"))


def config_from_args(args: argparse.Namespace) -> LoadTestConfig:
    if args.zipf is not None and args.popularity not in (None, "zipf"):
        raise ValueError("--zipf implies --popularity zipf")
    popularity = Popularity.ZIPF if args.zipf is not None else Popularity(args.popularity or "uniform")
    lo, _, hi = args.token_id_range.partition(",")
    return LoadTestConfig(
        url=args.url,
        out=args.out,
        rate=args.rate,
        concurrency=args.concurrency,
        num_requests=args.num_requests,
        duration_s=args.duration,
        adapters=[a for a in (args.adapters or "").split(",") if a],
        num_adapters=args.num_adapters,
        upload_model=args.upload_model,
        upload_rank=args.upload_rank,
        popularity=popularity,
        zipf_alpha=args.zipf if args.zipf is not None else 1.0,
        prompt_len=LengthSpec.parse(args.prompt_len),
        output_len=LengthSpec.parse(args.output_len),
        dataset=args.dataset,
        prompt_format=PromptFormat(args.prompt_format),
        token_id_range=(int(lo), int(hi)),
        endpoint=Endpoint(args.endpoint),
        model=args.model,
        send_adapter_id=args.send_adapter_id,
        ignore_eos=args.ignore_eos,
        api_key=args.api_key,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
        request_timeout_s=args.request_timeout,
        seed=args.seed,
        warmup_requests=args.warmup_requests,
        progress=args.progress,
    )


def run(cfg: LoadTestConfig) -> dict:
    """Upload (if asked), discover, run the load, write results.json, summary.md and the PNGs."""
    import httpx  # imported here: `switchboard --help` should not pay for matplotlib and torch

    from .plots import write_plots
    from .report import build_results, write_report
    from .runner import discover, resolve_adapters, run_load
    from .upload import upload_adapters

    uploaded: list[str] = []
    if cfg.upload_model is not None:
        assert cfg.num_adapters is not None
        print(f"[loadtest] uploading {cfg.num_adapters} LoRA r={cfg.upload_rank} adapters", flush=True)
        uploaded = upload_adapters(cfg.url, cfg.upload_model, cfg.num_adapters, cfg.upload_rank, cfg.seed, cfg.api_key)
        cfg.adapters, cfg.num_adapters = uploaded, None
    try:
        base, listed = discover(cfg)
    except httpx.HTTPError as exc:
        raise ValueError(f"cannot list models at {cfg.url}/v1/models: {exc}") from exc
    base = cfg.model or base
    adapters = resolve_adapters(cfg, listed)
    print(f"[loadtest] {cfg.url}: base model {base}; {len(adapters)} adapter(s) {adapters[:8]}", flush=True)
    records = asyncio.run(run_load(cfg, adapters, base))
    server = {"url": cfg.url, "base_model": base, "adapters": adapters, "uploaded": len(uploaded)}
    results = build_results(cfg, records, server)
    plots = write_plots(cfg.out, results)
    write_report(cfg.out, results, plots)
    s = results["summary"]
    print(
        f"[loadtest] sent {s['sent']}, completed {s['completed']}, errors {s['errors']} {s['errors_by_status']}; "
        f"{s['request_throughput']:.2f} req/s, {s['output_token_throughput']:.1f} output tok/s; "
        f"TTFT p50/p99 {s['ttft_ms']['p50'] or 0:.1f}/{s['ttft_ms']['p99'] or 0:.1f} ms, "
        f"TPOT p50/p99 {s['tpot_ms']['p50'] or 0:.1f}/{s['tpot_ms']['p99'] or 0:.1f} ms",
        flush=True,
    )
    print(f"[loadtest] report: {cfg.out / 'summary.md'}", flush=True)
    return results
