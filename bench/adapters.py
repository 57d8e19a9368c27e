"""`switchboard bench-adapters`: the adapter store's three performance figures, against a real server on 127.0.0.1.

1. Cold start: upload a LoRA r=16 on every linear layer, then stream one request with it; upload-to-first-token
   beside a warm request's time to first token (target: at most 50 ms more).
2. Many adapters: generated tokens/s with requests spread uniformly over N stored adapters (default 1,000) and
   `--slots` device slots (default 32), beside the same load on one adapter (target: at least 0.8x).
3. No eviction cliff: median time to first token with twice as many active adapters as slots, beside all resident
   (target: at most 3x).
The server runs in this process (uvicorn in a thread, the real engine and API); the client is httpx over TCP.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
from tqdm import tqdm

from switchboard.adapters_store import synthetic
from switchboard.adapters_store.kinds import BaseModelShape
from switchboard.adapters_store.kinds.base import ALL_LINEAR, ATTENTION, WEIGHTS_FILE
from switchboard.adapters_store.store import AdapterInfo, AdapterStore
from switchboard.loadtest.client import event_lines
from switchboard.serving.config import ServeConfig


def lora_files(base: BaseModelShape, rank: int, modules: tuple[str, ...], seed: int, dtype: torch.dtype) -> dict:
    """A seeded LoRA's two files (alpha = r, B of scale 1/r)."""
    return synthetic.lora_files(base, rank=rank, modules=modules, seed=seed, alpha=rank, b_scale=1 / rank, dtype=dtype)


def fill_store(root: Path, base: BaseModelShape, n: int, rank: int) -> list[str]:
    """N LoRA adapters (r=`rank` on q, k, v, o, bf16) written straight into a store; their ids."""
    store = AdapterStore(root)
    ids = [f"bulk-{i:04d}" for i in range(n)]
    with store.batch():
        for i, adapter_id in enumerate(tqdm(ids, desc="store", unit="adapter")):
            files = lora_files(base, rank, ATTENTION, seed=10_000 + i, dtype=torch.bfloat16)
            with store.staging() as staging:
                for name, data in files.items():
                    staging.write(name, iter([data]))
                params = sum(rank * sum(base.module_shape(m)) for m in ATTENTION) * base.num_layers
                store.commit(staging, "default", adapter_id, AdapterInfo("lora", rank, list(ATTENTION), params))
    return ids


@contextmanager
def running_server(config: ServeConfig) -> Iterator[str]:
    import uvicorn

    from switchboard.serving.api.app import create_app
    from switchboard.serving.engine.async_engine import AsyncEngine

    engine = AsyncEngine(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(engine, config), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


async def _request(client: httpx.AsyncClient, body: dict) -> tuple[float, int]:
    """Stream one completion: (time to first token, completion tokens)."""
    start = time.perf_counter()
    ttft = None
    tokens = 0
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread()).decode()}")
        async for line in event_lines(resp):
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    assert ttft is not None
    return ttft, tokens


async def _load(url: str, bodies: list[dict], concurrency: int) -> dict[str, float]:
    """Closed loop: `concurrency` requests in flight until all `bodies` are done."""
    queue = list(reversed(bodies))
    ttfts: list[float] = []
    tokens = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while queue:
            ttft, n = await _request(client, queue.pop())
            ttfts.append(ttft)
            tokens += n

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {
        "requests": len(bodies),
        "tokens_per_s": tokens / elapsed,
        "median_ttft_ms": 1000 * statistics.median(ttfts),
        "p90_ttft_ms": 1000 * statistics.quantiles(ttfts, n=10)[-1],
    }


def _bodies(models: list[str], prompts: list[list[int]], max_tokens: int) -> list[dict]:
    return [
        {"model": m, "prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        for m, p in zip(models, prompts, strict=True)
    ]


def cold_start(url: str, base: BaseModelShape, prompt: list[int], trials: int) -> dict[str, float]:
    """Upload a fresh LoRA r=16 (every linear) and time upload -> first token, beside warm requests' TTFT."""
    rows = []
    with httpx.Client(base_url=url, timeout=120) as http:
        for t in range(trials):
            files = lora_files(base, 16, ALL_LINEAR, seed=t, dtype=torch.float32)
            body = {"model": f"cold-{t}", "prompt": prompt, "max_tokens": 1, "temperature": 0}
            start = time.perf_counter()
            resp = http.post(
                "/v1/adapters", data={"adapter_id": f"cold-{t}"}, files={n: (n, d) for n, d in files.items()}
            )
            resp.raise_for_status()
            uploaded = time.perf_counter()
            first, _ = asyncio.run(_single(url, body))
            warm = statistics.median(asyncio.run(_single(url, body))[0] for _ in range(3))
            rows.append(
                {
                    "upload_ms": 1000 * (uploaded - start),
                    "first_request_ttft_ms": 1000 * first,
                    "upload_to_first_token_ms": 1000 * (uploaded - start + first),
                    "warm_ttft_ms": 1000 * warm,
                }
            )
    out = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    out["adapter_bytes"] = len(files[WEIGHTS_FILE])
    out["extra_ms"] = out["upload_to_first_token_ms"] - out["warm_ttft_ms"]
    return out


async def _single(url: str, body: dict) -> tuple[float, int]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await _request(client, body)


def run_bench_adapters(args: argparse.Namespace, model_dir: Path) -> dict:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    base = BaseModelShape.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    rng = random.Random(0)
    results: dict = {"model": str(model_dir), "dtype": args.dtype, "slots": args.slots, "threads": args.num_threads}
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        ids = fill_store(Path(tmp) / "store", base, args.num_adapters, args.rank)
        config = ServeConfig(
            model=model_dir,
            dtype=args.dtype,
            store=Path(tmp) / "store",
            max_resident_adapters=args.slots,
            max_num_seqs=2 * args.slots,
            kv_cache_gb=args.kv_cache_gb,
            num_threads=args.num_threads,
        )
        vocab = 256
        prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(args.num_requests)]

        @contextmanager
        def warm_server() -> Iterator[str]:
            """Each measurement on a fresh server: the LoRA slot stacks grow with what was registered (the
            cold-start adapters' rank 16 on every linear would otherwise widen every later batch's adapter work)."""
            with running_server(config) as url:
                asyncio.run(_load(url, _bodies([ids[0]] * 8, prompts[:8], 4), 4))  # warm-up: compile paths, caches
                yield url

        with warm_server() as url:
            print("cold start ...", flush=True)
            results["cold_start"] = cold_start(url, base, prompts[0], args.trials)
        with warm_server() as url:
            print("throughput: one adapter, then uniform over all ...", flush=True)
            single = asyncio.run(
                _load(url, _bodies([ids[0]] * args.num_requests, prompts, args.max_tokens), args.slots)
            )
            spread = [rng.choice(ids) for _ in range(args.num_requests)]
            uniform = asyncio.run(_load(url, _bodies(spread, prompts, args.max_tokens), args.slots))
            # Diagnostic: as many distinct adapters per batch, all resident (no loads): the kernels' share of the gap.
            resident = ids[-args.slots :]
            asyncio.run(_load(url, _bodies(resident, prompts[: args.slots], 1), args.slots))
            spread = [rng.choice(resident) for _ in range(args.num_requests)]
            distinct = asyncio.run(_load(url, _bodies(spread, prompts, args.max_tokens), args.slots))
            results["throughput"] = {
                "single_adapter": single,
                f"uniform_over_{len(ids)}": uniform,
                f"uniform_over_{args.slots}_resident": distinct,
                "ratio": uniform["tokens_per_s"] / single["tokens_per_s"],
                "ratio_resident": distinct["tokens_per_s"] / single["tokens_per_s"],
            }
        with warm_server() as url:
            print("eviction cliff: all resident, then twice as many adapters as slots ...", flush=True)
            concurrency = 2 * args.slots
            resident = ids[: args.slots]
            asyncio.run(_load(url, _bodies(resident, prompts[: args.slots], 1), args.slots))  # make them resident
            n = args.num_requests
            short = args.cliff_max_tokens
            all_resident = asyncio.run(
                _load(url, _bodies([rng.choice(resident) for _ in range(n)], prompts, short), concurrency)
            )
            active = ids[args.slots : 3 * args.slots]  # 2x slots, none resident at the start
            overflow = asyncio.run(
                _load(url, _bodies([rng.choice(active) for _ in range(n)], prompts, short), concurrency)
            )
            results["eviction_cliff"] = {
                "all_resident": all_resident,
                "twice_the_slots": overflow,
                "median_ttft_ratio": overflow["median_ttft_ms"] / all_resident["median_ttft_ms"],
            }
    _print(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"results in {args.out}")
    return results


def _print(r: dict) -> None:
    c, t, e = r["cold_start"], r["throughput"], r["eviction_cliff"]
    uniform_key = next(k for k in t if k.startswith("uniform"))
    print(
        f"\ncold start (LoRA r=16, every linear, {c['adapter_bytes'] / 2**20:.1f} MiB): upload {c['upload_ms']:.1f} ms "
        f"+ first TTFT {c['first_request_ttft_ms']:.1f} ms = {c['upload_to_first_token_ms']:.1f} ms; warm TTFT "
        f"{c['warm_ttft_ms']:.1f} ms; extra {c['extra_ms']:.1f} ms (target <= 50)"
    )
    print(
        f"throughput: one adapter {t['single_adapter']['tokens_per_s']:.0f} tok/s, {uniform_key} "
        f"{t[uniform_key]['tokens_per_s']:.0f} tok/s, ratio {t['ratio']:.2f} (target >= 0.8); "
        f"as many distinct adapters, all resident: ratio {t['ratio_resident']:.2f}"
    )
    print(
        f"median TTFT: all resident {e['all_resident']['median_ttft_ms']:.1f} ms, 2x adapters per slot "
        f"{e['twice_the_slots']['median_ttft_ms']:.1f} ms, ratio {e['median_ttft_ratio']:.2f} (target <= 3)"
    )
