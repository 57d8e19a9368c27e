"""profile.md and profile.png from the profiler's report (profile.json): pure rendering, no measurement."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

MIB = 2**20


def profile_markdown(report: dict) -> str:
    lines = [
        "# Merged versus unmerged adapters",
        "",
        f"Model {report['model']}, {report['dtype']}, {report['threads']} threads ({report['machine'] or 'cpu'}). "
        "Decode throughput of each configuration and its ratio to the base model, the median over runs each "
        "paired with a base run just before it. Requests spread round robin over a configuration's adapters, so a "
        "batch of n uses min(n, N) of its N adapters.",
    ]
    for n, rows in report["by_batch_size"].items():
        lines += [
            "",
            f"## {n} concurrent request{'s' if n != '1' else ''}",
            "",
            "| configuration | decode tok/s | generated tok/s (incl. prefill) | decode ratio to base (paired) |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {m['description']} | {m['decode_tok_s']:.0f} | {m['total_tok_s']:.0f} | {m['ratio_to_base']:.2f} |"
            for m in rows
        ]
    mem = report["memory_bytes"]
    lines += [
        "",
        f"## Memory ({report['memory_batch_size']} requests)",
        "",
        "| configuration | base weights MiB | adapters MiB | KV cache of the workload MiB | KV pool allocated MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in mem.items():
        lines.append(
            f"| {name} | {m['base_weights'] / MIB:.1f} | {m['adapters'] / MIB:.2f} | "
            f"{m['kv_cache_workload'] / MIB:.2f} | {m['kv_cache_allocated'] / MIB:.1f} |"
        )
    if report.get("peft_mixed_batch"):
        p = report["peft_mixed_batch"]
        lines += [
            "",
            f"PEFT mixed-batch `generate(adapter_names=...)` on the lora-r8-attn adapters, batch {p['batch_size']}: "
            f"{p['peft_tok_s']:.0f} generated tok/s against switchboard's {p['switchboard_tok_s']:.0f} "
            f"({p['switchboard_tok_s'] / p['peft_tok_s']:.1f}x).",
        ]
    if report.get("peer"):
        lines += ["", *peer_table(report["by_batch_size"], report["peer"])]
    lines += ["", "![profile](profile.png)", ""]
    return "\n".join(lines)


def peer_table(by_batch_size: dict[str, list[dict]], peer: dict) -> list[str]:
    """Switchboard (in-process) beside the peer (HTTP), generated tok/s including prefill, per batch size."""
    lines = [
        f"## Side by side with {peer['url']}",
        "",
        f"Peer over HTTP (streamed, {len(peer['adapters'])} adapters round robin); switchboard in-process. "
        "Generated tok/s including prefill.",
        "",
        "| batch | switchboard base | peer base | switchboard lora-r8-attn | peer adapters | peer p99 TPOT ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for n, rows in by_batch_size.items():
        by_name = {m["name"]: m for m in rows}
        p = peer["by_batch_size"].get(n, {})
        lora = by_name.get("lora-r8-attn")
        pa = p.get("adapters") or {}
        ours_lora = f"{lora['total_tok_s']:.0f}" if lora else "-"
        peer_lora = f"{pa['output_tok_s']:.0f}" if pa else "-"
        tpot = (pa or p.get("base") or {}).get("tpot_p99_ms") or 0.0
        lines.append(
            f"| {n} | {by_name['base']['total_tok_s']:.0f} | {p.get('base', {}).get('output_tok_s', 0):.0f} | "
            f"{ours_lora} | {peer_lora} | {tpot:.1f} |"
        )
    return lines


def profile_plot(report: dict, path: Path) -> Path:
    """Left: decode ratio to base per configuration, one bar per batch size. Right: memory per configuration."""
    sizes = list(report["by_batch_size"])
    names = [m["name"] for m in report["by_batch_size"][sizes[0]]]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(sizes)
    for k, n in enumerate(sizes):
        ratios = {m["name"]: m["ratio_to_base"] for m in report["by_batch_size"][n]}
        xs = [i + (k - (len(sizes) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [ratios[name] for name in names], width, label=f"batch {n}")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("decode throughput / base (paired median)")
    ax.set_title("Cost of adapters against the base model")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    mem = report["memory_bytes"]
    base = [mem[name]["base_weights"] / MIB for name in names]
    adapters = [mem[name]["adapters"] / MIB for name in names]
    kv = [mem[name]["kv_cache_workload"] / MIB for name in names]
    ax2.bar(names, base, label="base weights")
    ax2.bar(names, adapters, bottom=base, label="adapters")
    ax2.bar(names, kv, bottom=[b + a for b, a in zip(base, adapters, strict=True)], label="KV cache (workload)")
    ax2.set_ylabel("MiB")
    ax2.set_title(f"Memory, {report['memory_batch_size']} requests")
    ax2.tick_params(axis="x", labelrotation=30)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_profile_report(report: dict, out: Path) -> tuple[Path, Path]:
    md = out / "profile.md"
    md.write_text(profile_markdown(report))
    return md, profile_plot(report, out / "profile.png")
