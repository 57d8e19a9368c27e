"""The soak's actions, one HTTP request each, and how each answer counts (`soak_report.Outcome`).

Well-formed: `generate` (a completion or chat over the base model or any adapter the tenant sees, streamed or
whole, greedy or sampled), `cancel` (streamed, closed after one to three chunks), `upload` (a good adapter: 201 with
the sha256 of the bytes sent), `list` (every acknowledged upload of the tenant listed at its version). Hostile:
`hostile` and `bad-upload` (soak_cases.py), answered 4xx or, where allowed, in full.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import httpx

from switchboard.adapters_store.kinds.base import BaseModelShape

from .client import event_lines, request_body, send
from .config import Endpoint, PromptFormat
from .soak_cases import (
    ADAPTERS,
    BAD_UPLOADS,
    CHAT,
    COMPLETIONS,
    Files,
    Probe,
    SoakState,
    Upload,
    bad_upload,
    generation_probes,
    lora_upload,
    multipart,
    scaled_copy,
    upload_probe,
)
from .soak_report import Outcome
from .workload import PlannedRequest, make_prompt


class Answer(NamedTuple):
    case: str
    outcome: Outcome
    status: int | None = None
    tokens: int = 0
    error: str | None = None


def _failed(case: str, status: int | None, error: str) -> Answer:
    """A failure; its error starts with the HTTP status when there was one."""
    return Answer(case, Outcome.FAILED, status, 0, (error if status is None else f"HTTP {status}: {error}")[:500])


def _path(endpoint: Endpoint) -> str:
    return CHAT if endpoint is Endpoint.CHAT else COMPLETIONS


def _stream_error(chunk: dict) -> str | None:
    if "error" in chunk:
        return f"stream error: {json.dumps(chunk['error'])[:300]}"
    if any(c.get("finish_reason") == "error" for c in chunk.get("choices") or []):
        return "a choice finished with finish_reason 'error'"
    return None


def _answered(text: str) -> bool:
    """A 2xx body that is a whole answer: a stream ending in [DONE] without errors, or JSON with choices."""
    if text.startswith("data:"):
        events = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
        return events[-1:] == ["[DONE]"] and not any(_stream_error(json.loads(e)) for e in events[:-1])
    body = json.loads(text)
    return bool(body.get("choices")) and not _stream_error(body)


class Actions:
    """The actions over the current server's clients (`clients`: tenant -> client with its key, "" -> one without a
    key, for probes that send their own headers; replaced after a restart)."""

    def __init__(
        self,
        state: SoakState,
        demo: dict[str, tuple[str, Files]],
        base: BaseModelShape,
        *,
        max_request_bytes: int,
        max_adapter_bytes: int,
    ) -> None:
        self.state, self.demo, self.base = state, demo, base
        self.max_request_bytes, self.max_adapter_bytes = max_request_bytes, max_adapter_bytes
        self.clients: dict[str, httpx.AsyncClient] = {}
        self.pending: dict[tuple[str, str], Upload] = {}  # uploads sent and not yet answered
        self.ids = itertools.count()
        self.t0 = 0.0  # the soak's clock (perf_counter at its start), for the streamed requests' records
        self.handlers: dict[str, Callable[[str, random.Random], Awaitable[Answer]]] = {
            "generate": self.generate,
            "cancel": self.cancel,
            "hostile": self.hostile,
            "bad-upload": self.bad_upload,
            "upload": self.upload,
            "list": self.list_adapters,
        }

    async def run(self, action: str, tenant: str, rng: random.Random) -> Answer:
        """One action; a transport failure or an unreadable answer is a failure."""
        try:
            return await self.handlers[action](tenant, rng)
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            return _failed(action, None, f"{type(exc).__name__}: {exc}")

    def _plan(self, tenant: str, rng: random.Random, cancel: bool) -> tuple[PlannedRequest, Endpoint, dict, bool]:
        adapter = rng.choice([None, *self.state.visible(tenant)])
        endpoint = rng.choice((Endpoint.COMPLETIONS, Endpoint.CHAT))
        words = rng.randint(4, 40)
        prompt = make_prompt(PromptFormat.TEXT, words, (10, 500), rng)
        plan = PlannedRequest(next(self.ids), adapter, prompt, words, rng.randint(4, 24))
        by_id = adapter is not None and rng.random() < 0.3
        body = request_body(plan, endpoint, self.state.base_model, by_id, ignore_eos=rng.random() < 0.5)
        if rng.random() < 0.5:
            body |= {"temperature": 0.8, "top_p": 0.9, "seed": rng.randrange(1 << 30)}
        return plan, endpoint, body, cancel or rng.random() < 0.5

    async def generate(self, tenant: str, rng: random.Random) -> Answer:
        plan, endpoint, body, stream = self._plan(tenant, rng, cancel=False)
        case = f"{endpoint.value}, {'streamed' if stream else 'whole'}, {plan.adapter or 'base'}"
        client = self.clients[tenant]
        if stream:
            rec = await send(client, plan, body, endpoint, self.t0)
            if rec.ok:
                return Answer(case, Outcome.COMPLETED, rec.status, rec.completion_tokens)
            return _failed(case, rec.status, rec.error or "")
        body["stream"] = False
        del body["stream_options"]
        resp = await client.post(_path(endpoint), json=body)
        if resp.status_code != 200:
            return _failed(case, resp.status_code, resp.text)
        answer = resp.json()
        if error := _stream_error(answer):
            return _failed(case, 200, error)
        return Answer(case, Outcome.COMPLETED, 200, answer["usage"]["completion_tokens"])

    async def cancel(self, tenant: str, rng: random.Random) -> Answer:
        """Stream, read one to three chunks of text, then close the connection."""
        plan, endpoint, body, _ = self._plan(tenant, rng, cancel=True)
        case, after, seen = f"{endpoint.value}, cancelled, {plan.adapter or 'base'}", rng.randint(1, 3), 0
        async with self.clients[tenant].stream("POST", _path(endpoint), json=body) as resp:
            if resp.status_code != 200:
                return _failed(case, resp.status_code, (await resp.aread()).decode(errors="replace"))
            async for line in event_lines(resp):
                data = line[5:].strip() if line.startswith("data:") else None
                if data == "[DONE]":
                    return Answer(case, Outcome.COMPLETED, 200, seen)
                if data:
                    chunk = json.loads(data)
                    if error := _stream_error(chunk):
                        return _failed(case, 200, error)
                    seen += any((c.get("delta") or {}).get("content") or c.get("text") for c in chunk["choices"])
                    if seen >= after:
                        return Answer(case, Outcome.CANCELLED, 200, seen)  # leaving the block closes the stream
        return _failed(case, 200, "the stream ended without [DONE]")

    async def upload(self, tenant: str, rng: random.Random) -> Answer:
        """A good upload (a seeded LoRA, or a scaled copy of a start-up adapter of another kind): 201, and the
        acknowledged sha256 is that of the bytes sent."""
        n, seed = next(self.ids), rng.randrange(1 << 30)
        others = sorted(i for i, (kind, _) in self.demo.items() if kind != "lora")
        if others and rng.random() < 0.5:
            kind, files = self.demo[rng.choice(others)]
            up = await asyncio.to_thread(
                scaled_copy, files, kind, tenant, f"{tenant}-{kind}-{n}", rng.uniform(0.9, 1.1)
            )
        else:
            up = await asyncio.to_thread(lora_upload, self.base, tenant, f"{tenant}-lora-{n}", seed)
        case = f"{up.kind} upload"
        self.pending[(tenant, up.adapter_id)] = up
        try:
            resp = await self.clients[tenant].post(
                ADAPTERS, data={"adapter_id": up.adapter_id}, files=multipart(up.files)
            )
        finally:
            del self.pending[(tenant, up.adapter_id)]
        if resp.status_code != 201:
            return _failed(case, resp.status_code, resp.text)
        if (got := resp.json().get("sha256")) != up.sha256:
            return _failed(case, 201, f"acknowledged as sha256 {got}, but the bytes sent hash to {up.sha256}")
        self.state.acked[(tenant, up.adapter_id)] = up
        return Answer(case, Outcome.COMPLETED, 201)

    async def list_adapters(self, tenant: str, rng: random.Random) -> Answer:
        """GET /v1/adapters lists every upload of the tenant's acknowledged before it was sent, at its version."""
        expected = {i: up.sha256 for (t, i), up in self.state.acked.items() if t == tenant}
        resp = await self.clients[tenant].get(ADAPTERS)
        if resp.status_code != 200:
            return _failed("list", resp.status_code, resp.text)
        listed = {a["id"]: a["sha256"] for a in resp.json()["data"] if a.get("owner") == tenant}
        wrong = sorted(i for i, sha in expected.items() if listed.get(i) != sha)
        return _failed("list", 200, f"missing or changed: {wrong}") if wrong else Answer("list", Outcome.COMPLETED, 200)

    async def hostile(self, tenant: str, rng: random.Random) -> Answer:
        return await self.probe(rng.choice(generation_probes(self.state, tenant, rng, self.max_request_bytes)))

    async def bad_upload(self, tenant: str, rng: random.Random) -> Answer:
        case = rng.choice(BAD_UPLOADS)
        args = (case, self.base, rng.randrange(1 << 30), self.max_adapter_bytes)
        adapter_id, parts = await asyncio.to_thread(bad_upload, *args)
        return await self.probe(upload_probe(case, adapter_id, parts, self.state.keys[tenant]))

    async def probe(self, probe: Probe) -> Answer:
        try:
            resp = await self.clients[""].request(probe.method, probe.path, **probe.kwargs)  # type: ignore[arg-type]
        except httpx.TimeoutException as exc:
            return _failed(probe.case, None, f"timed out ({type(exc).__name__})")
        except httpx.TransportError as exc:
            if probe.may_close:
                return Answer(probe.case, Outcome.REFUSED, None, 0, f"connection closed: {type(exc).__name__}")
            return _failed(probe.case, None, f"{type(exc).__name__}: {exc}")
        status = resp.status_code
        if 400 <= status < 500 and status != 429:
            return Answer(probe.case, Outcome.REFUSED, status)
        if 200 <= status < 300 and probe.may_succeed and _answered(resp.text):
            return Answer(probe.case, Outcome.COMPLETED, status)
        return _failed(probe.case, status, f"not refused: {resp.text}")
