"""Metrics, overload (429), client disconnects and a soak of mixed requests with cancellations."""

from __future__ import annotations

import asyncio
import gc
import random
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

LONG = 1900  # tokens: a request that would take seconds to finish if it were left running after its client left


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_until_idle(url: str, timeout_s: float) -> dict:
    """Poll /metrics until no request runs or waits and no KV block is held; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(url)
        busy = [
            name
            for name in (
                "switchboard_num_requests_running",
                "switchboard_num_requests_waiting",
                "switchboard_kv_cache_blocks_used",
            )
            if metric(samples, name) != 0
        ]
        if not busy:
            return samples
        if time.monotonic() > deadline:
            pytest.fail(
                f"server still busy {timeout_s} s later: "
                + ", ".join(f"{name}={metric(samples, name)}" for name in busy)
            )
        time.sleep(0.02)


@pytest.fixture(scope="session")
def narrow_server(server_factory):
    """One sequence at a time and one waiting: the third concurrent request is refused."""
    return server_factory(max_num_seqs=1, max_waiting=1)


def test_metrics_exposition(client: openai.OpenAI, server, model_name: str) -> None:
    before = scrape(server.url)
    client.completions.create(model=model_name, prompt="import sys\n", max_tokens=5, extra_body={"ignore_eos": True})
    list(
        client.chat.completions.create(
            model=model_name,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="x", max_tokens=1)
    after = wait_until_idle(server.url, 5)

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("switchboard_requests_total", endpoint="/v1/completions", status="200") == 1
    assert grew("switchboard_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert grew("switchboard_requests_total", endpoint="/v1/completions", status="404") == 1
    assert grew("switchboard_time_to_first_token_seconds_count") == 2
    assert grew("switchboard_e2e_request_latency_seconds_count") == 2
    assert grew("switchboard_time_per_output_token_seconds_count") == 2
    assert 0 < grew("switchboard_time_to_first_token_seconds_sum") < 10
    assert grew("switchboard_generation_tokens_total") == 9
    assert grew("switchboard_prompt_tokens_total") > 5
    assert metric(after, "switchboard_kv_cache_blocks_total") == server.engine.config.num_kv_blocks
    assert metric(after, "switchboard_kv_cache_blocks_used") == 0
    assert metric(after, "switchboard_kv_cache_usage_ratio") == 0
    assert metric(after, "switchboard_num_requests_running") == 0
    assert metric(after, "switchboard_num_requests_waiting") == 0
    # Gauges follow a running request.
    with client.completions.create(
        model=model_name, prompt="x", max_tokens=LONG, stream=True, extra_body={"ignore_eos": True}
    ) as stream:
        next(iter(stream))
        during = scrape(server.url)
    assert metric(during, "switchboard_num_requests_running") >= 1
    assert metric(during, "switchboard_kv_cache_blocks_used") >= 1
    assert 0 < metric(during, "switchboard_kv_cache_usage_ratio") <= 1
    wait_until_idle(server.url, 2)


def test_overload_answers_429(narrow_server) -> None:
    body = {"prompt": "x", "max_tokens": 200, "ignore_eos": True}

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=narrow_server.url, timeout=60) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(6)))

    responses = asyncio.run(fire())
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 429 in statuses, statuses
    assert set(statuses) <= {200, 429}
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_exceeded" and error["message"]
    wait_until_idle(narrow_server.url, 5)

    # The openai client sees RateLimitError (with retries off).
    async def fire_openai() -> list[object]:
        async with openai.AsyncOpenAI(base_url=narrow_server.api_url, api_key="x", max_retries=0) as client:
            calls = [
                client.completions.create(
                    model=narrow_server.engine.model_name, prompt="x", max_tokens=200, extra_body={"ignore_eos": True}
                )
                for _ in range(6)
            ]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(fire_openai())
    assert any(isinstance(r, openai.RateLimitError) for r in results)
    wait_until_idle(narrow_server.url, 5)


def test_stream_disconnect_aborts(narrow_server) -> None:
    """A client that leaves mid-stream frees the only sequence slot at once; the next request is not delayed."""
    url = narrow_server.url
    with httpx.Client(base_url=url, timeout=60) as http:
        with http.stream(
            "POST", "/v1/completions", json={"prompt": "x", "max_tokens": LONG, "ignore_eos": True, "stream": True}
        ) as resp:
            lines = resp.iter_lines()
            for _ in range(3):
                next(lines)
        start = time.monotonic()
        wait_until_idle(url, 1.0)
        quick = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert quick.status_code == 200
        assert time.monotonic() - start < 1.5


def test_non_streaming_disconnect_aborts(narrow_server) -> None:
    url = narrow_server.url
    before = scrape(url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{url}/v1/completions",
            json={"prompt": "x", "max_tokens": LONG, "ignore_eos": True, "n": 1},
            timeout=httpx.Timeout(60, read=0.2),
        )
    after = wait_until_idle(url, 1.0)
    assert (
        metric(after, "switchboard_requests_total", endpoint="/v1/completions", status="499")
        - metric(before, "switchboard_requests_total", endpoint="/v1/completions", status="499")
        == 1
    )


def test_soak_mixed_requests_with_cancellations(server) -> None:
    """200 mixed requests, 8 at a time, a quarter abandoned mid-stream; the server ends idle with no block held.

    An abandoned request asks for LONG tokens: had it been left running it would keep the server busy for seconds.
    """
    model = server.engine.model_name
    rng = random.Random(0)
    prompts = ["def f(x):\n", "import os\n", "class A:\n    ", "# a comment about things\n", "x = [1, 2, 3]\n" * 4]
    outcome: dict[str, int] = {"completed": 0, "streamed": 0, "cancelled": 0}

    async def one(client: openai.AsyncOpenAI, i: int, gate: asyncio.Semaphore) -> None:
        prompt = rng.choice(prompts)
        chat = i % 3 == 0
        mode = ("cancel", "stream", "plain", "stream")[i % 4]
        max_tokens = LONG - 100 if mode == "cancel" else rng.randint(1, 12)
        kwargs: dict = {
            "model": model,
            "max_tokens": max_tokens,
            "temperature": rng.choice([0.0, 0.8]),
            "n": rng.choice([1, 1, 2]),
            "extra_body": {"ignore_eos": mode == "cancel"},
        }
        if mode != "plain" and rng.random() < 0.3:
            kwargs["stream_options"] = {"include_usage": True}
        create = client.chat.completions.create if chat else client.completions.create
        kwargs |= {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
        async with gate:
            if mode == "plain":
                resp = await create(**kwargs)
                assert len(resp.choices) == kwargs["n"]
                assert all(c.finish_reason in ("stop", "length") for c in resp.choices)
                outcome["completed"] += 1
                return
            stream = await create(stream=True, **kwargs)
            if mode == "cancel":
                for _ in range(3):
                    await stream.__anext__()
                await stream.close()
                outcome["cancelled"] += 1
                return
            finished = set()
            async for chunk in stream:
                finished |= {c.index for c in chunk.choices if c.finish_reason is not None}
            assert finished == set(range(kwargs["n"]))
            outcome["streamed"] += 1

    async def soak() -> None:
        gate = asyncio.Semaphore(8)
        async with openai.AsyncOpenAI(base_url=server.api_url, api_key="x", max_retries=0, timeout=60) as client:
            await asyncio.gather(*(one(client, i, gate) for i in range(200)))
            await one(client, 200, gate)  # a last abandoned stream, alone: nothing else could hide it if it leaked
        gc.collect()  # finalize the client's abandoned generators here, where their loop runs (see below)
        await asyncio.sleep(0.05)

    # Closing a stream early leaves the client library's (httpx) async generators suspended in reference cycles.
    # Collected automatically, they could be finalized from the server's threads (same process) and report
    # "async generator already executing"; so the collector only runs inside the client's loop.
    gc.disable()
    try:
        started = time.monotonic()
        asyncio.run(soak())
    finally:
        gc.enable()

    assert outcome == {"completed": 50, "streamed": 100, "cancelled": 51}
    samples = wait_until_idle(server.url, 1)
    assert metric(samples, "switchboard_kv_cache_blocks_used") == 0
    assert time.monotonic() - started < 60
