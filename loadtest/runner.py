"""Drive the load: Poisson arrivals or a closed loop, bounded by request count and duration, with a progress bar.

The test stops sending at --num-requests or --duration, whichever comes first, then waits for the requests in
flight (each bounded by --request-timeout), so every request sent is either completed or recorded as an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import replace

import httpx
from tqdm import tqdm

from .client import RequestRecord, request_body, send
from .config import LoadTestConfig
from .workload import PlannedRequest, plan_requests, poisson_gaps


def discover(cfg: LoadTestConfig) -> tuple[str | None, list[str]]:
    """(base model name, adapter ids) from GET /v1/models: adapters are the entries with a `parent`."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    resp = httpx.get(f"{cfg.url}/v1/models", headers=headers, timeout=30)
    resp.raise_for_status()
    cards = resp.json()["data"]
    base = next((c["id"] for c in cards if not c.get("parent")), None)
    adapters = [c["id"] for c in cards if c.get("parent")]
    return base, adapters


def resolve_adapters(cfg: LoadTestConfig, listed: list[str]) -> list[str | None]:
    """The adapters requests spread over; [None] (the base model) when none are asked for."""
    if cfg.adapters:
        return list(cfg.adapters)
    if cfg.num_adapters is not None:
        if len(listed) < cfg.num_adapters:
            raise ValueError(f"--num-adapters {cfg.num_adapters}, but the server lists only {len(listed)} adapters")
        return list(listed[: cfg.num_adapters])
    return [None]


class _Bounds:
    """Hands out planned requests until the count or the deadline is reached."""

    def __init__(self, cfg: LoadTestConfig, plans: Iterator[PlannedRequest], t0: float) -> None:
        self._plans = plans
        self._left = cfg.num_requests
        self._deadline = None if cfg.duration_s is None else t0 + cfg.duration_s

    def next(self) -> PlannedRequest | None:
        if self._left is not None and self._left <= 0:
            return None
        if self._deadline is not None and time.perf_counter() >= self._deadline:
            return None
        if self._left is not None:
            self._left -= 1
        return next(self._plans)

    def seconds_left(self) -> float:
        return float("inf") if self._deadline is None else self._deadline - time.perf_counter()


async def _warm_up(
    client: httpx.AsyncClient, cfg: LoadTestConfig, adapters: list[str | None], base_model: str | None
) -> None:
    """Requests of the same shapes, not recorded: the server's first batches pay for set-up (kernels, caches)."""
    plans = plan_requests(replace(cfg, seed=cfg.seed + 7919), adapters)  # other prompts than the timed ones
    gate = asyncio.Semaphore(cfg.concurrency or cfg.warmup_requests)

    async def one(plan: PlannedRequest) -> None:
        async with gate:
            body = request_body(plan, cfg.endpoint, base_model, cfg.send_adapter_id, cfg.ignore_eos)
            await send(client, plan, body, cfg.endpoint, time.perf_counter())

    await asyncio.gather(*(one(next(plans)) for _ in range(cfg.warmup_requests)))


async def run_load(cfg: LoadTestConfig, adapters: list[str | None], base_model: str | None) -> list[RequestRecord]:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would drown the output
    plans = plan_requests(cfg, adapters)
    records: list[RequestRecord] = []
    limits = httpx.Limits(max_connections=cfg.concurrency or 1000, max_keepalive_connections=cfg.concurrency or 100)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    bar = tqdm(total=cfg.num_requests, unit="req", desc="loadtest", disable=not cfg.progress, dynamic_ncols=True)
    async with httpx.AsyncClient(
        base_url=cfg.url, timeout=httpx.Timeout(cfg.request_timeout_s), limits=limits, headers=headers
    ) as client:
        if cfg.warmup_requests:
            await _warm_up(client, cfg, adapters, base_model)
        t0 = time.perf_counter()
        bounds = _Bounds(cfg, plans, t0)

        async def one(plan: PlannedRequest, scheduled: float | None) -> None:
            body = request_body(plan, cfg.endpoint, base_model, cfg.send_adapter_id, cfg.ignore_eos)
            rec = await send(client, plan, body, cfg.endpoint, t0, scheduled)
            records.append(rec)
            bar.update(1)
            if not rec.ok:
                bar.set_postfix(errors=sum(not r.ok for r in records))

        if cfg.concurrency is not None:

            async def worker() -> None:
                while (plan := bounds.next()) is not None:
                    await one(plan, None)

            await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        else:
            assert cfg.rate is not None
            tasks: list[asyncio.Task] = []
            arrival = 0.0
            for gap in poisson_gaps(cfg.rate, cfg.seed):
                arrival += gap
                wait = t0 + arrival - time.perf_counter()
                if wait > bounds.seconds_left():
                    break
                if wait > 0:
                    await asyncio.sleep(wait)
                plan = bounds.next()
                if plan is None:
                    break
                tasks.append(asyncio.create_task(one(plan, arrival)))
            await asyncio.gather(*tasks)
    bar.close()
    records.sort(key=lambda r: r.index)
    return records
