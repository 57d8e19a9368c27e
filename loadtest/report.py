"""results.json (configuration, every request, summary) and summary.md, the report a person reads first."""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from .client import RequestRecord
from .config import LoadTestConfig
from .stats import per_adapter, summarize, throughput_timeline

SCHEMA_PATH = Path(__file__).with_name("results.schema.json")
SCHEMA_VERSION = 1
TOP_ADAPTERS = 8


def build_results(
    cfg: LoadTestConfig, records: Sequence[RequestRecord], server: dict[str, object]
) -> dict[str, object]:
    return {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "client": {"host": platform.node(), "python": platform.python_version()},
        "server": server,
        "config": cfg.to_json(),
        "summary": summarize(records, cfg.slo_ttft_ms, cfg.slo_tpot_ms),
        "per_adapter": per_adapter(records, TOP_ADAPTERS),
        "timeline": throughput_timeline(records),
        "requests": [r.to_json() for r in records],
    }


def _ms(x: object) -> str:
    return "-" if x is None else f"{x:,.1f}"


def summary_markdown(results: dict, plots: Sequence[str]) -> str:
    cfg, s = results["config"], results["summary"]
    arrivals = f"Poisson at {cfg['rate']} req/s" if cfg["rate"] is not None else f"closed loop of {cfg['concurrency']}"
    bounds = " and ".join(
        x
        for x in (
            f"{cfg['num_requests']} requests" if cfg["num_requests"] is not None else "",
            f"{cfg['duration_s']} s" if cfg["duration_s"] is not None else "",
        )
        if x
    )
    adapters = results["server"].get("adapters") or []
    lines = [
        "# Load test",
        "",
        f"Server {cfg['url']} ({results['server'].get('base_model')}), {results['created']}.",
        f"Arrivals: {arrivals}; bounded by {bounds}; "
        f"{len(adapters)} adapter(s), popularity {cfg['popularity']}"
        + (f" (alpha {cfg['zipf_alpha']})" if cfg["popularity"] == "zipf" else "")
        + f"; prompt {cfg['prompt_len']} tokens, output {cfg['output_len']} tokens, {cfg['endpoint']}, streamed.",
        "",
        "| sent | completed | errors | duration s | req/s | output tok/s | total tok/s | goodput req/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {s['sent']} | {s['completed']} | {s['errors']} | {s['duration_s']:.2f} | {s['request_throughput']:.2f} "
        f"| {s['output_token_throughput']:,.1f} | {s['total_token_throughput']:,.1f} "
        f"| {s['goodput']['request_rate']:.2f} |",
        "",
        "| latency (ms) | mean | p50 | p90 | p99 | max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "inter-token"), ("e2e_ms", "end to end")):
        d = s[key]
        lines.append(
            f"| {label} | {_ms(d['mean'])} | {_ms(d['p50'])} | {_ms(d['p90'])} | {_ms(d['p99'])} | {_ms(d['max'])} |"
        )
    g = s["goodput"]
    lines += [
        "",
        goodput_line(g, s["sent"]),
    ]
    if s["errors_by_status"]:
        lines += ["", "Errors by status: " + ", ".join(f"{k}: {v}" for k, v in s["errors_by_status"].items())]
    lines += [
        "",
        f"## Busiest adapters (top {TOP_ADAPTERS})",
        "",
        "| adapter | requests | errors | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | E2E p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["per_adapter"]:
        lines.append(
            f"| {row['adapter'] or '(base model)'} | {row['requests']} | {row['errors']} "
            f"| {_ms(row['ttft_ms']['p50'])} | {_ms(row['ttft_ms']['p99'])} | {_ms(row['tpot_ms']['p50'])} "
            f"| {_ms(row['tpot_ms']['p99'])} | {_ms(row['e2e_ms']['p99'])} |"
        )
    lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    lines += ["", "Every request's record is in results.json (schema: results.schema.json)."]
    return "\n".join(lines) + "\n"


def write_report(out: Path, results: dict, plots: Sequence[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    shutil.copyfile(SCHEMA_PATH, out / "results.schema.json")
    (out / "summary.md").write_text(summary_markdown(results, plots))


def goodput_line(g: dict, sent: int) -> str:
    """The goodput sentence, naming only the SLO bounds that were set (--slo-ttft-ms, --slo-tpot-ms)."""
    limits = (("TTFT", "slo_ttft_ms"), ("TPOT", "slo_tpot_ms"))
    bounds = [f"{name} <= {_ms(g[key])} ms" for name, key in limits if g[key] is not None]
    if not bounds:
        return (
            f"Goodput: {g['requests']} of {sent} requests ({g['fraction']:.0%}) completed; no SLO was set "
            "(--slo-ttft-ms, --slo-tpot-ms), so every completed request counts."
        )
    return f"Goodput: {g['requests']} of {sent} requests ({g['fraction']:.0%}) met the SLO ({', '.join(bounds)})."
