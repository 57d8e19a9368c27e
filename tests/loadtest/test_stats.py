"""Percentiles, goodput, throughput and the workload generator on data whose answers are known by hand."""

from __future__ import annotations

import statistics
from collections import Counter

import pytest

from switchboard.loadtest.client import RequestRecord
from switchboard.loadtest.config import LengthSpec, LoadTestConfig, Popularity
from switchboard.loadtest.stats import distribution, per_adapter, percentile, summarize, throughput_timeline
from switchboard.loadtest.workload import adapter_weights, plan_requests, poisson_gaps


def test_percentile_interpolates_between_closest_ranks() -> None:
    xs = [15.0, 20.0, 35.0, 40.0, 50.0]  # unsorted input is fine too
    assert percentile(xs, 0) == 15.0 and percentile(xs, 100) == 50.0
    assert percentile(xs, 50) == 35.0
    assert percentile(list(reversed(xs)), 40) == pytest.approx(29.0)  # pos 1.6: 20 + 0.6 * 15
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)  # pos 98.01
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_distribution_fields() -> None:
    d = distribution([1.0, 2.0, 3.0, 4.0])
    assert d == {
        "count": 4,
        "mean": 2.5,
        "min": 1.0,
        "max": 4.0,
        "p50": 2.5,
        "p90": pytest.approx(3.7),
        "p99": pytest.approx(3.97),
    }
    assert distribution([])["p99"] is None


def _rec(index: int, start: float, ttft: float, tokens: int, end: float, adapter: str = "a", **kw) -> RequestRecord:
    gaps = (end - start - ttft) / (tokens - 1) if tokens > 1 else 0.0
    return RequestRecord(
        index=index,
        adapter=adapter,
        prompt_len=10,
        max_tokens=tokens,
        start_s=start,
        first_token_s=start + ttft,
        end_s=end,
        status=200,
        prompt_tokens=10,
        completion_tokens=tokens,
        num_chunks=tokens,
        itl_ms=[gaps * 1e3] * (tokens - 1),
        **kw,
    )


def test_summary_throughput_goodput_and_errors() -> None:
    records = [
        _rec(0, 0.0, 0.1, 11, 1.1),  # TTFT 100 ms, TPOT 100 ms
        _rec(1, 0.5, 0.5, 11, 2.0),  # TTFT 500 ms, TPOT 100 ms
        _rec(2, 1.0, 0.1, 6, 4.1),  # TTFT 100 ms, TPOT 600 ms
        RequestRecord(3, "b", 10, 8, start_s=1.5, end_s=1.6, status=429, error="HTTP 429", error_kind="http"),
        RequestRecord(4, "b", 10, 8, start_s=2.0, end_s=2.5, status=None, error="reset", error_kind="transport"),
    ]
    s = summarize(records, slo_ttft_ms=200, slo_tpot_ms=200)
    assert (s["sent"], s["completed"], s["errors"]) == (5, 3, 2)
    assert s["errors_by_status"] == {"429": 1, "transport": 1}
    assert s["duration_s"] == pytest.approx(4.1)  # first start 0.0 to last end 4.1
    assert s["output_token_throughput"] == pytest.approx(28 / 4.1)
    assert s["total_token_throughput"] == pytest.approx((28 + 30) / 4.1)
    assert s["request_throughput"] == pytest.approx(3 / 4.1)
    assert s["ttft_ms"]["p50"] == pytest.approx(100) and s["ttft_ms"]["max"] == pytest.approx(500)
    assert s["tpot_ms"]["mean"] == pytest.approx((100 + 100 + 600) / 3)
    assert s["e2e_ms"]["p50"] == pytest.approx(1500)
    assert s["itl_ms"]["count"] == 10 + 10 + 5
    g = s["goodput"]  # only request 0 meets both limits
    assert (g["requests"], g["fraction"]) == (1, pytest.approx(1 / 5))
    assert g["request_rate"] == pytest.approx(1 / 4.1)
    assert summarize(records)["goodput"]["requests"] == 3  # no limits: every completed request counts
    assert summarize(records, slo_ttft_ms=200)["goodput"]["requests"] == 2


def test_per_adapter_orders_busiest_first_and_timeline_conserves_tokens() -> None:
    records = [_rec(i, i * 0.1, 0.05, 5, i * 0.1 + 1.0, adapter="x" if i % 3 else "y") for i in range(9)]
    rows = per_adapter(records)
    assert [(r["adapter"], r["requests"]) for r in rows] == [("x", 6), ("y", 3)]
    assert per_adapter(records, top=1)[0]["adapter"] == "x"
    tl = throughput_timeline(records, bin_s=0.5)
    assert sum(tl["output_tok_s"]) * 0.5 == pytest.approx(45)
    assert sum(tl["requests_s"]) * 0.5 == pytest.approx(9)


def _cfg(**kw) -> LoadTestConfig:
    return LoadTestConfig(url="http://x/v1/", out=".", concurrency=1, num_requests=10, **kw)


def test_config_validation() -> None:
    assert _cfg().url == "http://x"
    with pytest.raises(ValueError, match="exactly one"):
        LoadTestConfig(url="u", out=".", rate=1.0, concurrency=2, num_requests=1)
    with pytest.raises(ValueError, match="stop by itself"):
        LoadTestConfig(url="u", out=".", rate=1.0)
    with pytest.raises(ValueError, match="disagree"):
        _cfg(adapters=["a"], num_adapters=2)
    assert LengthSpec.parse("32:128") == LengthSpec(32, 128) and str(LengthSpec.parse("7")) == "7"
    with pytest.raises(ValueError):
        LengthSpec.parse("9:3")
    assert "api_key" not in _cfg(api_key="secret").to_json()


def test_popularity_patterns_and_lengths() -> None:
    names = ["a", "b", "c", "d"]
    zipf = adapter_weights(Popularity.ZIPF, 4, 1.0)
    assert zipf == pytest.approx([x / (1 + 1 / 2 + 1 / 3 + 1 / 4) for x in (1, 1 / 2, 1 / 3, 1 / 4)])

    def adapters_of(pop: Popularity, n: int = 2000, **kw) -> list[str]:
        plans = plan_requests(_cfg(popularity=pop, prompt_len=LengthSpec(3, 9), **kw), list(names))
        return [next(plans).adapter for _ in range(n)]

    assert adapters_of(Popularity.DISTINCT, 8) == names * 2
    assert set(adapters_of(Popularity.IDENTICAL, 50)) == {"a"}
    counts = Counter(adapters_of(Popularity.ZIPF, zipf_alpha=1.0))
    assert counts["a"] > counts["b"] > counts["c"] > counts["d"]
    assert abs(counts["a"] / 2000 - zipf[0]) < 0.05
    uniform = Counter(adapters_of(Popularity.UNIFORM))
    assert all(abs(c / 2000 - 0.25) < 0.05 for c in uniform.values())
    plans = plan_requests(_cfg(prompt_len=LengthSpec(3, 9), output_len=LengthSpec(5, 5)), [None])
    sample = [next(plans) for _ in range(200)]
    assert {len(p.prompt) for p in sample} == set(range(3, 10))
    assert all(p.max_tokens == 5 and p.prompt_len == len(p.prompt) for p in sample)
    assert all(10 <= t < 500 for p in sample for t in p.prompt)


def test_dataset_rows_and_poisson_gaps(tmp_path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "hello there", "max_tokens": 3}\n\n{"prompt": [5, 6, 7]}\n')
    plans = plan_requests(_cfg(dataset=data, output_len=LengthSpec(9, 9)), [None])
    first, second, third = (next(plans) for _ in range(3))
    assert (first.prompt, first.max_tokens, second.prompt, second.max_tokens) == ("hello there", 3, [5, 6, 7], 9)
    assert third.prompt == "hello there"
    gaps = poisson_gaps(4.0, seed=1)
    xs = [next(gaps) for _ in range(4000)]
    assert statistics.mean(xs) == pytest.approx(0.25, rel=0.08)
