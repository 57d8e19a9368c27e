"""Latency statistics and throughput of a finished load test: pure functions over request records."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from .client import RequestRecord

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default, "linear").

    Semantics: sorted xs of length n; position p = (n - 1) * q / 100; result xs[floor(p)] + (p - floor(p)) *
    (xs[ceil(p)] - xs[floor(p)]).
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must lie in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


def distribution(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, min, max and p50/p90/p99 (None where there are no values)."""
    if not values:
        return {"count": 0, "mean": None, "min": None, "max": None, **{f"p{q}": None for q in PERCENTILES}}
    return {
        "count": len(values),
        "mean": sum(values) / len(values),
        "min": min(values),
        "max": max(values),
        **{f"p{q}": percentile(values, q) for q in PERCENTILES},
    }


def meets_slo(rec: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    """A completed request within both limits; a limit left as None is not checked. A one-token answer has no
    time per output token and meets any TPOT limit."""
    if not rec.ok:
        return False
    if slo_ttft_ms is not None and (rec.ttft_ms is None or rec.ttft_ms > slo_ttft_ms):
        return False
    tpot = rec.tpot_ms
    return slo_tpot_ms is None or tpot is None or tpot <= slo_tpot_ms


def error_key(rec: RequestRecord) -> str:
    """ "429", "500", ... for HTTP errors; "transport" or "stream" for the others."""
    if rec.error_kind == "http" and rec.status is not None:
        return str(rec.status)
    return rec.error_kind or "unknown"


def summarize(
    records: Sequence[RequestRecord], slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None
) -> dict[str, object]:
    """The summary block of results.json.

    The wall time runs from the first request's start to the last request's end, so that throughput counts every
    token served while the test ran. Rates are per second of that wall time; goodput is the rate of requests that
    completed within the SLO.
    """
    done = [r for r in records if r.ok]
    starts = [r.start_s for r in records]
    ends = [r.end_s for r in records if r.end_s is not None]
    duration = (max(ends) - min(starts)) if records and ends else 0.0
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    out_tokens = sum(r.completion_tokens for r in done)
    in_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in done)
    good = [r for r in done if meets_slo(r, slo_ttft_ms, slo_tpot_ms)]
    errors = Counter(error_key(r) for r in records if not r.ok)
    return {
        "sent": len(records),
        "completed": len(done),
        "errors": len(records) - len(done),
        "errors_by_status": dict(sorted(errors.items())),
        "duration_s": duration,
        "request_throughput": per_s(len(done)),
        "output_token_throughput": per_s(out_tokens),
        "total_token_throughput": per_s(out_tokens + in_tokens),
        "prompt_tokens": in_tokens,
        "completion_tokens": out_tokens,
        "ttft_ms": distribution([r.ttft_ms for r in done if r.ttft_ms is not None]),
        "tpot_ms": distribution([r.tpot_ms for r in done if r.tpot_ms is not None]),
        "itl_ms": distribution([x for r in done for x in r.itl_ms]),
        "e2e_ms": distribution([r.e2e_ms for r in done if r.e2e_ms is not None]),
        "goodput": {
            "slo_ttft_ms": slo_ttft_ms,
            "slo_tpot_ms": slo_tpot_ms,
            "requests": len(good),
            "request_rate": per_s(len(good)),
            "fraction": len(good) / len(records) if records else 0.0,
        },
    }


def per_adapter(records: Sequence[RequestRecord], top: int | None = None) -> list[dict[str, object]]:
    """Per adapter: requests, errors, TTFT/TPOT/E2E distributions; busiest first (most requests, then name)."""
    groups: dict[str | None, list[RequestRecord]] = {}
    for r in records:
        groups.setdefault(r.adapter, []).append(r)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), str(kv[0])))[:top]
    rows = []
    for adapter, recs in ordered:
        done = [r for r in recs if r.ok]
        rows.append(
            {
                "adapter": adapter,
                "requests": len(recs),
                "errors": len(recs) - len(done),
                "completion_tokens": sum(r.completion_tokens for r in done),
                "ttft_ms": distribution([r.ttft_ms for r in done if r.ttft_ms is not None]),
                "tpot_ms": distribution([r.tpot_ms for r in done if r.tpot_ms is not None]),
                "e2e_ms": distribution([r.e2e_ms for r in done if r.e2e_ms is not None]),
            }
        )
    return rows


def throughput_timeline(records: Sequence[RequestRecord], bin_s: float = 1.0) -> dict[str, list[float]]:
    """Output tokens/s and completed requests/s in bins of `bin_s` seconds from the first start.

    A request's tokens are spread evenly over its text chunks, placed at each chunk's arrival time.
    """
    done = [r for r in records if r.ok and r.first_token_s is not None]
    if not records:
        return {"t_s": [], "output_tok_s": [], "requests_s": []}
    t0 = min(r.start_s for r in records)
    end = max((r.end_s for r in records if r.end_s is not None), default=t0)
    n = max(1, math.ceil((end - t0) / bin_s))
    tokens = [0.0] * n
    completions = [0.0] * n

    def slot(t: float) -> int:
        return min(n - 1, int((t - t0) / bin_s))

    for r in done:
        times = [r.first_token_s]
        for gap in r.itl_ms:
            times.append(times[-1] + gap / 1e3)
        per_chunk = r.completion_tokens / len(times)
        for t in times:
            tokens[slot(t)] += per_chunk
        completions[slot(r.end_s)] += 1  # type: ignore[arg-type]
    return {
        "t_s": [(i + 0.5) * bin_s for i in range(n)],
        "output_tok_s": [x / bin_s for x in tokens],
        "requests_s": [x / bin_s for x in completions],
    }
