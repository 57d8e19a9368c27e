"""Side by side of several load tests (e.g. switchboard and vLLM on one workload): compare.md and compare.png.

    python -m switchboard.loadtest.compare NAME=DIR [NAME=DIR ...] --out DIR

Each DIR holds a `switchboard loadtest` results.json; several directories may share a NAME (repeated runs): the
table lists every run and the median, the plot overlays every run's latency CDFs in the NAME's colour.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

_METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2e_ms", "end to end"))


def load_runs(specs: list[str]) -> dict[str, list[dict]]:
    """NAME=DIR pairs -> {name: [results, ...]} in the order given."""
    runs: dict[str, list[dict]] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            raise ValueError(f"expected NAME=DIR, got {spec!r}")
        runs.setdefault(name, []).append(json.loads((Path(path) / "results.json").read_text()))
    return runs


def compare_markdown(runs: dict[str, list[dict]]) -> str:
    lines = [
        "# Load tests side by side",
        "",
        "| server | runs | output tok/s (each) | median tok/s | p99 TPOT ms (each) | p99 TTFT ms (each) | errors |",
        "|---|---:|---|---:|---|---|---:|",
    ]
    for name, results in runs.items():
        s = [r["summary"] for r in results]
        tok = [x["output_token_throughput"] for x in s]
        tpot = " / ".join(f"{x['tpot_ms']['p99']:.1f}" for x in s)
        ttft = " / ".join(f"{x['ttft_ms']['p99']:,.0f}" for x in s)
        each = " / ".join(f"{t:,.0f}" for t in tok)
        errors = sum(x["errors"] for x in s)
        lines.append(f"| {name} | {len(s)} | {each} | {statistics.median(tok):,.0f} | {tpot} | {ttft} | {errors} |")
    medians = {n: statistics.median(r["summary"]["output_token_throughput"] for r in rs) for n, rs in runs.items()}
    if len(medians) >= 2:
        first, *others = medians
        lines += [""] + [f"{first} / {o}: {medians[first] / medians[o]:.2f}x output tok/s (medians)" for o in others]
    lines += ["", "![compare](compare.png)", ""]
    return "\n".join(lines)


def compare_plot(runs: dict[str, list[dict]], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(_METRICS) + 1, figsize=(16, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, results) in enumerate(runs.items()):
        colour = colours[k % len(colours)]
        for j, r in enumerate(results):
            ok = [q for q in r["requests"] if q["ok"]]
            for ax, (key, _) in zip(axes, _METRICS, strict=False):
                xs = sorted(q[key] for q in ok if q[key] is not None)
                if xs:
                    ys = [(i + 1) / len(xs) for i in range(len(xs))]
                    ax.step(xs, ys, where="post", color=colour, alpha=0.8, label=name if j == 0 else None)
        tok = [r["summary"]["output_token_throughput"] for r in results]
        axes[-1].bar(k, statistics.median(tok), color=colour)
        axes[-1].scatter([k] * len(tok), tok, color="black", s=12, zorder=3)
    for ax, (_, title) in zip(axes, _METRICS, strict=False):
        ax.set_title(f"{title} CDF")
        ax.set_xlabel("ms")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[-1].set_xticks(range(len(runs)), list(runs))
    axes[-1].set_title("output tokens/s (median, runs as dots)")
    axes[-1].grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m switchboard.loadtest.compare", description=__doc__)
    parser.add_argument("runs", nargs="+", metavar="NAME=DIR")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    runs = load_runs(args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    md = compare_markdown(runs)
    (args.out / "compare.md").write_text(md)
    compare_plot(runs, args.out / "compare.png")
    print(md)


if __name__ == "__main__":
    main()
