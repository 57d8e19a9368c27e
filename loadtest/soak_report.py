"""The soak's bookkeeping: one Result per request, the server's RSS samples, the verdict, the JSON and the PNG.

Pure functions over plain records (the plot aside), so the verdict's rules are tested without a server.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

from .serve_process import child_pids


class Outcome(StrEnum):
    COMPLETED = "completed"  # answered in full (a well-formed request, or a hostile one that may be answered)
    REFUSED = "refused"  # a hostile request answered 4xx (or its connection closed where that is allowed)
    CANCELLED = "cancelled"  # streamed, then closed by the client mid-stream as planned
    FAILED = "failed"  # a well-formed request that did not complete (collateral), or a hostile one not refused
    KILLED = "killed"  # did not complete because the server was killed under it (not collateral)


@dataclass(slots=True)
class Result:
    action: str  # generate, cancel, upload, list, hostile, bad-upload
    case: str  # what exactly: "chat, streamed, demo-ia3" or the hostile case's name
    tenant: str
    start_s: float
    end_s: float
    outcome: Outcome
    status: int | None = None
    tokens: int = 0
    error: str | None = None

    @property
    def hostile(self) -> bool:
        return self.action in ("hostile", "bad-upload")


@dataclass(frozen=True, slots=True)
class RssSample:
    t_s: float
    pid: int
    rss_bytes: int


def read_rss(pid: int) -> int | None:
    """Resident set size of a live server from /proc, its child processes (the engine core) included; None once
    the server is gone."""
    own = _process_rss(pid)
    if own is None:
        return None
    return own + sum(_process_rss(child) or 0 for child in child_pids(pid))


def _process_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def rss_growth(samples: list[RssSample], warmup_s: float, window: int = 5) -> list[dict[str, object]]:
    """Per server process: the baseline (median of the first `window` samples after its first `warmup_s` seconds),
    the end (median of its last `window` samples), the peak after warm-up, and the growth end / baseline - 1. A
    process with fewer than 2 * window samples after its warm-up takes half of them each; None with fewer than 2."""
    out = []
    for pid in dict.fromkeys(s.pid for s in samples):
        own = [s for s in samples if s.pid == pid]
        warm = [s for s in own if s.t_s >= own[0].t_s + warmup_s]
        row: dict[str, object] = {"pid": pid, "start_s": own[0].t_s, "end_s": own[-1].t_s, "samples": len(own)}
        if len(warm) >= 2:
            n = min(window, len(warm) // 2)
            base = statistics.median(s.rss_bytes for s in warm[:n])
            end = statistics.median(s.rss_bytes for s in warm[-n:])
            row |= {"baseline_mib": base / 2**20, "end_mib": end / 2**20, "growth": end / base - 1}
            row["peak_mib"] = max(s.rss_bytes for s in warm) / 2**20
        else:
            row["growth"] = None
        out.append(row)
    return out


def counts(results: list[Result]) -> dict[str, int]:
    tally = Counter(r.outcome.value for r in results)
    out = {o.value: tally.get(o.value, 0) for o in Outcome}
    out["collateral"] = sum(r.outcome is Outcome.FAILED and not r.hostile for r in results)
    out["hostile_not_refused"] = sum(r.outcome is Outcome.FAILED and r.hostile for r in results)
    return out


def by_case(results: list[Result]) -> dict[str, dict[str, object]]:
    """action: case -> outcome counts and the statuses seen (hostile cases and failures in detail)."""
    table: dict[str, dict[str, object]] = {}
    for r in results:
        key = f"{r.action}: {r.case}" if r.hostile or r.outcome is Outcome.FAILED else r.action
        row = table.setdefault(key, {"outcomes": Counter(), "statuses": Counter()})
        row["outcomes"][r.outcome.value] += 1  # type: ignore[index]
        row["statuses"][str(r.status)] += 1  # type: ignore[index]
    return {k: {n: dict(v) for n, v in row.items()} for k, row in sorted(table.items())}  # type: ignore[union-attr]


PROBLEMS = {
    "lost": "acknowledged upload(s) lost",
    "altered": "acknowledged upload(s) altered",
    "unusable": "acknowledged upload(s) unusable",
    "unexpected": "upload(s) stored that were never acknowledged",
}


def verdict(
    tally: dict[str, int], uploads: list[dict[str, object]], rss: list[dict[str, object]], limit: float, problems: list
) -> list[str]:
    """Why the soak fails; empty when it passes. `problems`: those found outside the requests and the uploads."""
    reasons = []
    if tally["collateral"]:
        reasons.append(f"{tally['collateral']} well-formed request(s) failed outside the kill (collateral)")
    if tally["hostile_not_refused"]:
        reasons.append(f"{tally['hostile_not_refused']} hostile request(s) answered 5xx, timed out or accepted")
    for check in uploads:
        for problem, what in PROBLEMS.items():
            if check.get(problem):
                reasons.append(f"{check['when']}: {len(check[problem])} {what}")  # type: ignore[arg-type]
    for row in rss:
        growth = row["growth"]
        if isinstance(growth, float) and growth > limit:
            reasons.append(f"server pid {row['pid']}: RSS grew {growth:+.1%} after warm-up (limit {limit:.0%})")
    return reasons + problems


def timeline(results: list[Result], samples: list[RssSample], bucket_s: float) -> dict[str, list]:
    """Per bucket of `bucket_s` seconds: completed requests and generated tokens per second, and the mean RSS."""
    end = max([r.end_s for r in results] + [s.t_s for s in samples] + [0.0])
    n = int(end // bucket_s) + 1
    reqs, toks, rss_sum, rss_n = [0] * n, [0] * n, [0.0] * n, [0] * n
    for r in results:
        if r.outcome is Outcome.COMPLETED:
            i = int(r.end_s // bucket_s)
            reqs[i] += 1
            toks[i] += r.tokens
    for s in samples:
        i = int(s.t_s // bucket_s)
        rss_sum[i] += s.rss_bytes / 2**20
        rss_n[i] += 1
    return {
        "t_s": [i * bucket_s for i in range(n)],
        "requests_per_s": [x / bucket_s for x in reqs],
        "tokens_per_s": [x / bucket_s for x in toks],
        "rss_mib": [s / c if c else None for s, c in zip(rss_sum, rss_n, strict=True)],
    }


def result_json(r: Result) -> dict[str, object]:
    return {**asdict(r), "outcome": r.outcome.value}


def plot(summary: dict, path: Path) -> Path:
    """RSS and throughput over time, the kill marked (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for row in summary["rss"]["samples_by_pid"]:
        top.plot(row["t_s"], row["rss_mib"], label=f"pid {row['pid']}")
    top.set_ylabel("server RSS (MiB)")
    top.legend(loc="lower right")
    line = summary["timeline"]
    bottom.plot(line["t_s"], line["tokens_per_s"], label="generated tokens/s")
    bottom.plot(line["t_s"], line["requests_per_s"], label="completed requests/s")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper right")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        if summary["kill"] is not None:
            ax.axvline(summary["kill"]["at_s"], color="red", linestyle="--", linewidth=1)
    top.set_title("soak: server RSS and throughput (red: kill -9 and restart)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summarize(
    config: dict[str, object],
    results: list[Result],
    samples: list[RssSample],
    uploads: list[dict[str, object]],
    kill: dict[str, object] | None,
    problems: list[str],
) -> dict[str, object]:
    """The whole run as JSON: counts, per-case outcomes, failures, upload checks, RSS, the timeline and the
    verdict. `problems`: failures found outside the requests (a crash, a missing kill, requests left running)."""
    duration, limit = float(config["duration_s"]), float(config["rss_limit"])  # type: ignore[arg-type]
    tally = counts(results)
    rss = rss_growth([s for s in samples if s.t_s <= duration], float(config["warmup"]) * duration)  # type: ignore[arg-type]
    by_pid = [
        {"pid": pid, "t_s": [s.t_s for s in samples if s.pid == pid],
         "rss_mib": [s.rss_bytes / 2**20 for s in samples if s.pid == pid]}
        for pid in dict.fromkeys(s.pid for s in samples)
    ]  # fmt: skip
    reasons = verdict(tally, uploads, rss, limit, problems)
    return {
        "config": config,
        "counts": tally,
        "by_case": by_case(results),
        "failures": [result_json(r) for r in results if r.outcome is Outcome.FAILED][:200],
        "killed": [result_json(r) for r in results if r.outcome is Outcome.KILLED],
        "uploads": uploads,
        "kill": kill,
        "rss": {"limit": limit, "by_server": rss, "samples_by_pid": by_pid},
        "timeline": timeline(results, samples, bucket_s=max(5.0, duration / 60)),
        "verdict": {"passed": not reasons, "reasons": reasons},
    }


def summary_lines(summary: dict) -> list[str]:
    """What the soak prints at the end."""
    c, cfg, kill = summary["counts"], summary["config"], summary["kill"]
    lines = [
        f"[soak] {cfg['duration_s']:.0f} s, {cfg['concurrency']} clients: completed {c['completed']}, refused "
        f"{c['refused']}, cancelled {c['cancelled']}, failed {c['failed']} (collateral {c['collateral']}, hostile "
        f"not refused {c['hostile_not_refused']}), killed in flight {c['killed']}"
    ]
    if kill is not None:
        lines.append(
            f"[soak] kill -9 at {kill['at_s']:.0f} s with {kill['in_flight']} request(s) in flight; "
            f"restarted in {kill['restarted_s'] - kill['at_s']:.1f} s"
        )
    for check in summary["uploads"]:
        usable = f", {len(check['unusable'])} unusable" if "unusable" in check else ""
        lines.append(
            f"[soak] uploads {check['when']}: {check['acknowledged']} acknowledged, {len(check['lost'])} lost, "
            f"{len(check['altered'])} altered{usable}, {len(check['unexpected'])} stored unacknowledged"
        )
    rows = []
    for row in summary["rss"]["by_server"]:
        if row["growth"] is None:
            rows.append(f"pid {row['pid']} not measured (ran {row['end_s'] - row['start_s']:.0f} s)")
        else:
            rows.append(
                f"pid {row['pid']} {row['baseline_mib']:.0f} -> {row['end_mib']:.0f} MiB ({row['growth']:+.1%}, "
                f"peak {row['peak_mib']:.0f})"
            )
    lines.append(f"[soak] server RSS after warm-up: {'; '.join(rows)} (limit +{summary['rss']['limit']:.0%})")
    for failure in summary["failures"][:10]:
        lines.append(f"[soak]   failed: {failure['action']} ({failure['case']}): {failure['error']}")
    verdict_ = summary["verdict"]
    lines.append("[soak] PASS" if verdict_["passed"] else "[soak] FAIL: " + "; ".join(verdict_["reasons"]))
    return lines
