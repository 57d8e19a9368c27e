"""The profiler's workload against another OpenAI-compatible server (`switchboard profile --peer-url`).

For each batch size n: n concurrent streamed requests of P prompt tokens and M new tokens (greedy, EOS ignored),
`repeats` times over, once naming the base model and once spread round robin over the peer's adapters. The figure
is generated tokens per second over the wall time, prefill included, with the p99 time per output token: what the
profiler's "generated tok/s (incl. prefill)" column measures in-process, here through HTTP.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from .config import LengthSpec, LoadTestConfig, Popularity
from .runner import discover, run_load
from .stats import summarize


def _one(
    url: str, n: int, prompt_len: int, max_tokens: int, repeats: int, adapters: list[str | None], base: str | None
) -> dict[str, float | int | None]:
    cfg = LoadTestConfig(
        url=url,
        out=Path(tempfile.gettempdir()),
        concurrency=n,
        num_requests=n * repeats,
        adapters=[a for a in adapters if a is not None],
        popularity=Popularity.DISTINCT,
        prompt_len=LengthSpec(prompt_len, prompt_len),
        output_len=LengthSpec(max_tokens, max_tokens),
        warmup_requests=n,
        progress=False,
    )
    s = summarize(asyncio.run(run_load(cfg, adapters, base)))
    return {
        "output_tok_s": s["output_token_throughput"],
        "tpot_p99_ms": s["tpot_ms"]["p99"],
        "ttft_p50_ms": s["ttft_ms"]["p50"],
        "errors": s["errors"],
    }


def run_peer(
    url: str, sizes: list[int], prompt_len: int, max_tokens: int, repeats: int, adapters: str | None = None
) -> dict:
    probe = LoadTestConfig(url=url, out=Path("."), concurrency=1, num_requests=1)
    base, listed = discover(probe)
    chosen = [a for a in (adapters or "").split(",") if a] or listed
    out: dict[str, object] = {"url": probe.url, "base_model": base, "adapters": chosen, "by_batch_size": {}}
    for n in sizes:
        print(f"[profile] peer {probe.url}: batch {n}, base model then {len(chosen)} adapters", flush=True)
        row = {"base": _one(probe.url, n, prompt_len, max_tokens, repeats, [None], base)}
        if chosen:
            row["adapters"] = _one(probe.url, n, prompt_len, max_tokens, repeats, list(chosen), base)
        out["by_batch_size"][str(n)] = row  # type: ignore[index]
    return out
