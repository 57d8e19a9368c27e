"""PNG plots of a load test: latency CDFs, throughput over time, latency of the busiest adapters (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt

_LATENCIES = (
    ("ttft_ms", "time to first token"),
    ("tpot_ms", "time per output token"),
    ("itl_ms", "inter-token latency"),
    ("e2e_ms", "end-to-end latency"),
)


def _cdf(ax, values: list[float], title: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of requests" if "inter" not in title else "fraction of gaps")
    ax.grid(alpha=0.3)
    if not values:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    xs = sorted(values)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step(xs, ys, where="post")
    for q, style in ((0.5, ":"), (0.9, "--"), (0.99, "-.")):
        ax.axhline(q, color="grey", linestyle=style, linewidth=0.8)


def latency_cdfs(results: dict, path: Path) -> Path:
    ok = [r for r in results["requests"] if r["ok"]]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title) in zip(axes.flat, _LATENCIES, strict=True):
        values = [x for r in ok for x in r[key]] if key == "itl_ms" else [r[key] for r in ok if r[key] is not None]
        _cdf(ax, values, title)
    fig.suptitle("Latency CDFs (dotted p50, dashed p90, dash-dot p99)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def throughput_over_time(results: dict, path: Path) -> Path:
    tl = results["timeline"]
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(tl["t_s"], tl["output_tok_s"], label="output tokens/s", color="tab:blue")
    ax.set_xlabel("seconds since the first request")
    ax.set_ylabel("output tokens/s", color="tab:blue")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(tl["t_s"], tl["requests_s"], label="completed requests/s", color="tab:orange")
    ax2.set_ylabel("completed requests/s", color="tab:orange")
    ax.set_title("Throughput over time (1 s bins)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def per_adapter_latency(results: dict, path: Path) -> Path:
    """Box plots of TTFT and TPOT of the busiest adapters (most requests first)."""
    busiest = [row["adapter"] for row in results["per_adapter"]]
    by_adapter: dict[object, list[dict]] = {a: [] for a in busiest}
    for r in results["requests"]:
        if r["ok"] and r["adapter"] in by_adapter:
            by_adapter[r["adapter"]].append(r)
    labels = [str(a) if a is not None else "(base)" for a in busiest]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "ttft_ms", "TTFT (ms)"), (axes[1], "tpot_ms", "TPOT (ms)")):
        data = [[r[key] for r in by_adapter[a] if r[key] is not None] or [0.0] for a in busiest]
        if data:
            ax.boxplot(data, tick_labels=labels, showfliers=True)
        ax.set_title(f"{title} of the busiest adapters")
        ax.tick_params(axis="x", labelrotation=30)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(out: Path, results: dict) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    return [
        str(latency_cdfs(results, out / "latency_cdf.png")),
        str(throughput_over_time(results, out / "throughput.png")),
        str(per_adapter_latency(results, out / "adapter_latency.png")),
    ]
