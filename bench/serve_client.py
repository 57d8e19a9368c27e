"""W's client in `switchboard bench-serve`: aiohttp, as vLLM's own serving benchmark uses, on the same two cores as
the server it measures.

The client shares the machine with the server, so every CPU-second it spends parsing HTTP is taken from the server's
step. httpx (the load tester's client) spent 0.24 CPU-seconds on one W run (2,048 streamed events), aiohttp 0.08-0.11
(C parsers for HTTP and chunked encoding); each run's client CPU time is recorded in the results. Every server gets
the same client, and the events are read and timed as the load tester reads them (`loadtest.client.read_events`).
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
from collections.abc import AsyncIterator

import aiohttp

from switchboard.loadtest.client import (
    TRANSPORT_ERROR,
    RequestRecord,
    finish,
    read_events,
    refused,
    request_body,
    sse_lines,
)
from switchboard.loadtest.config import Endpoint
from switchboard.loadtest.workload import PlannedRequest


async def _texts(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    async for chunk in content.iter_any():
        yield decoder.decode(chunk)
    yield decoder.decode(b"", final=True)


async def send(session: aiohttp.ClientSession, url: str, plan: PlannedRequest, t0: float) -> RequestRecord:
    """One streamed completion of W, timed; server and network failures are recorded, never raised."""
    body = request_body(plan, Endpoint.COMPLETIONS, None, False, True)
    rec = RequestRecord(plan.index, plan.adapter, plan.prompt_len, plan.max_tokens, time.perf_counter() - t0)
    done = False
    try:
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            rec.status = resp.status
            if resp.status != 200:
                return refused(rec, resp.status, await resp.read(), t0)
            done = await read_events(rec, sse_lines(_texts(resp.content)), Endpoint.COMPLETIONS, t0)
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        rec.error, rec.error_kind = f"{type(exc).__name__}: {exc}"[:500], TRANSPORT_ERROR
    return finish(rec, done, t0)


async def run(url: str, models: list[str], prompts: list[list[int]], max_tokens: int) -> dict[str, object]:
    """W once: every prompt at once (request i names models[i % len(models)]); tok/s, latencies, client CPU time."""
    plans = [PlannedRequest(i, models[i % len(models)], p, len(p), max_tokens) for i, p in enumerate(prompts)]
    connector = aiohttp.TCPConnector(limit=len(prompts))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        cpu0, t0 = time.process_time(), time.perf_counter()
        records = await asyncio.gather(*(send(session, url, plan, t0) for plan in plans))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    errors = [r.error for r in records if not r.ok]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(records)} requests failed against {url}: {errors[0]}")
    tokens = sum(r.completion_tokens for r in records)
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "client_cpu_s": cpu,
        "tpot_ms": [r.tpot_ms for r in records if r.tpot_ms is not None],
        "itl_ms": [x for r in records for x in r.itl_ms],
        "ttft_ms": [r.ttft_ms for r in records if r.ttft_ms is not None],
    }
