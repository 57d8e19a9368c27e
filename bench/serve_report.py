"""`switchboard bench-serve`'s outputs: the Markdown table with ratios, the targets, and a PNG (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _cpu(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _ratio(row: dict, ref: dict | None) -> str:
    return "-" if ref is None else f"{row['tok_s_median'] / ref['tok_s_median']:.2f}x"


def print_table(report: dict) -> None:
    w = report["workload"]
    configs = report["configs"]
    print(
        f"\nWorkload W: {w['requests']} concurrent requests x {w['prompt_tokens']} prompt tokens, "
        f"{w['max_tokens']} new tokens, greedy, EOS ignored; {report['model']}, {report['dtype']}; "
        f"{report['rounds']} alternating rounds; {report['uptime_end']}"
    )
    print("Ratios of medians here; the targets below use the median of per-round (paired) ratios.\n")
    print(
        "| configuration | generated tok/s, median (min-max) | vs ours in process | vs vLLM, LoRA disabled "
        "| p99 TPOT ms | p99 ITL ms | client CPU s per run | load avg (1 min) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    own, peer = configs.get(report["references"]["own"]), configs.get(report["references"]["peer"])
    for name, row in configs.items():
        print(
            f"| {name} | {row['tok_s_median']:.0f} ({row['tok_s_min']:.0f}-{row['tok_s_max']:.0f}) "
            f"| {_ratio(row, own)} | {_ratio(row, peer)} | {_ms(row['tpot_p99_ms'])} | {_ms(row['itl_p99_ms'])} "
            f"| {_cpu(row.get('client_cpu_s_median'))} | {row['loadavg_1min_median']:.2f} |"
        )
    print("\n| target | measured | met |")
    print("|---|---|---|")
    for t in report["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.2f}x"
        met = "not measured" if t["met"] is None else ("yes" if t["met"] else "no")
        print(f"| {t['target']} | {value} | {met} |")


def plot(report: dict, path: Path) -> Path:
    """Median generated tok/s per configuration (bars: min-max over rounds) and p99 TPOT."""
    names = list(report["configs"])
    rows = [report["configs"][n] for n in names]
    med = [r["tok_s_median"] for r in rows]
    err = [
        [m - r["tok_s_min"] for m, r in zip(med, rows, strict=True)],
        [r["tok_s_max"] - m for m, r in zip(med, rows, strict=True)],
    ]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.6 * len(names) + 2))
    ys = range(len(names))
    ax1.barh(ys, med, xerr=err, color="tab:blue", capsize=3)
    ax1.set_yticks(list(ys), names)
    ax1.invert_yaxis()
    ax1.set_xlabel("generated tokens/s (median, min-max over rounds)")
    ax1.grid(axis="x", alpha=0.3)
    tpot = [r["tpot_p99_ms"] or 0.0 for r in rows]
    ax2.barh(ys, tpot, color="tab:orange")
    ax2.set_yticks(list(ys), [""] * len(names))
    ax2.invert_yaxis()
    ax2.set_xlabel("p99 time per output token, ms (HTTP only)")
    ax2.grid(axis="x", alpha=0.3)
    w = report["workload"]
    fig.suptitle(
        f"W: {w['requests']} x ({w['prompt_tokens']} in, {w['max_tokens']} out), {Path(report['model']).name}, "
        f"{report['dtype']}, {report['rounds']} rounds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
