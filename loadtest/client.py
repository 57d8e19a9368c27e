"""One streamed request against any OpenAI-compatible server, timed chunk by chunk.

Times are seconds on the runner's monotonic clock, relative to the start of the test. The time to first token is
the arrival of the first chunk that carries text; inter-token latencies are the gaps between text-carrying chunks
(a chunk may hold more than one token, e.g. when a byte-level tokenizer holds back a partial character); the
completion token count comes from the final usage chunk (`stream_options.include_usage`) when the server sends
one, else from the number of text chunks.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

from .config import Endpoint
from .workload import PlannedRequest

TRANSPORT_ERROR = "transport"  # no HTTP status: connection refused, reset, timed out
STREAM_ERROR = "stream"  # status 200, but the stream carried an error (event or finish_reason) or ended without [DONE]


@dataclass(slots=True)
class RequestRecord:
    index: int
    adapter: str | None
    prompt_len: int
    max_tokens: int
    start_s: float  # when the request was sent
    scheduled_s: float | None = None  # Poisson arrival time (None in a closed loop)
    first_token_s: float | None = None
    end_s: float | None = None
    status: int | None = None  # HTTP status; None when the connection failed
    error: str | None = None  # None when the request completed
    error_kind: str | None = None  # "http", "transport" or "stream"
    prompt_tokens: int | None = None  # from usage
    completion_tokens: int = 0
    num_chunks: int = 0
    itl_ms: list[float] = field(default_factory=list)
    usage_tokens: int | None = None  # completion tokens as the usage chunk counts them

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_s is None else (self.first_token_s - self.start_s) * 1e3

    @property
    def e2e_ms(self) -> float | None:
        return None if self.end_s is None else (self.end_s - self.start_s) * 1e3

    @property
    def tpot_ms(self) -> float | None:
        """Mean time per output token after the first: (E2E - TTFT) / (tokens - 1)."""
        if self.end_s is None or self.first_token_s is None or self.completion_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) * 1e3 / (self.completion_tokens - 1)

    def to_json(self) -> dict[str, object]:
        return {
            "index": self.index,
            "adapter": self.adapter,
            "ok": self.ok,
            "status": self.status,
            "error": self.error,
            "error_kind": self.error_kind,
            "prompt_len": self.prompt_len,
            "max_tokens": self.max_tokens,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "num_chunks": self.num_chunks,
            "scheduled_s": self.scheduled_s,
            "start_s": self.start_s,
            "first_token_s": self.first_token_s,
            "end_s": self.end_s,
            "ttft_ms": self.ttft_ms,
            "tpot_ms": self.tpot_ms,
            "e2e_ms": self.e2e_ms,
            "itl_ms": self.itl_ms,
        }


def request_body(
    plan: PlannedRequest, endpoint: Endpoint, base_model: str | None, send_adapter_id: bool, ignore_eos: bool
) -> dict[str, object]:
    """`model` names the adapter (the vLLM and LoRAX convention) or the base model; `adapter_id` on request."""
    body: dict[str, object] = {
        "model": plan.adapter or base_model,
        "max_tokens": plan.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    if send_adapter_id:
        body["adapter_id"] = plan.adapter
    if endpoint is Endpoint.CHAT:
        body["messages"] = [{"role": "user", "content": plan.prompt}]
    else:
        body["prompt"] = plan.prompt
    return body


def _chunk_text(chunk: dict, endpoint: Endpoint) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        if endpoint is Endpoint.CHAT:
            text += (choice.get("delta") or {}).get("content") or ""
        else:
            text += choice.get("text") or ""
    return text


_SSE_LINE_END = re.compile(r"\r\n|\r|\n")


async def sse_lines(texts: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream's lines as SSE ends them (CRLF, LF or CR), from its decoded text in chunks of any size. (httpx's
    aiter_lines also breaks at NEL, U+2028 and the like, which a server may send raw inside an event's JSON.)"""
    rest = ""
    async for text in texts:
        *lines, rest = _SSE_LINE_END.split(rest + text)
        for line in lines:
            yield line
    if rest:
        yield rest


def event_lines(resp: httpx.Response) -> AsyncIterator[str]:
    """An httpx response's SSE lines (`sse_lines`)."""
    return sse_lines(resp.aiter_text())


async def read_events(rec: RequestRecord, lines: AsyncIterator[str], endpoint: Endpoint, t0: float) -> bool:
    """Time a 200 stream's events into `rec` (chunks, TTFT, ITLs, usage, an error event); True when it ended with
    [DONE]. Raises json.JSONDecodeError for an event that is not JSON."""
    last: float | None = None
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return True
        now = time.perf_counter() - t0
        chunk = json.loads(data)
        if "error" in chunk:
            rec.error, rec.error_kind = f"stream error: {json.dumps(chunk['error'])[:500]}", STREAM_ERROR
            continue
        if any(c.get("finish_reason") == "error" for c in chunk.get("choices") or []):
            rec.error, rec.error_kind = "a choice finished with finish_reason 'error'", STREAM_ERROR
        if chunk.get("usage"):
            rec.usage_tokens = chunk["usage"].get("completion_tokens")
            rec.prompt_tokens = chunk["usage"].get("prompt_tokens")
        if _chunk_text(chunk, endpoint):
            rec.num_chunks += 1
            if last is None:
                rec.first_token_s = now
            else:
                rec.itl_ms.append((now - last) * 1e3)
            last = now
    return False


def refused(rec: RequestRecord, status: int, body: bytes, t0: float) -> RequestRecord:
    """Close `rec` for an answer other than 200 (`body`: what the server said)."""
    rec.error, rec.error_kind = f"HTTP {status}: {body.decode(errors='replace')[:500]}", "http"
    rec.end_s = time.perf_counter() - t0
    return rec


def finish(rec: RequestRecord, done: bool, t0: float) -> RequestRecord:
    """Close `rec` once its stream has ended (`done`: with [DONE])."""
    rec.end_s = time.perf_counter() - t0
    if rec.error is None and not done:
        rec.error, rec.error_kind = "the stream ended without [DONE]", STREAM_ERROR
    rec.completion_tokens = rec.usage_tokens if rec.usage_tokens is not None else rec.num_chunks
    return rec


async def send(
    client: httpx.AsyncClient,
    plan: PlannedRequest,
    body: dict[str, object],
    endpoint: Endpoint,
    t0: float,
    scheduled_s: float | None = None,
) -> RequestRecord:
    """Send one streaming request and time it; never raises for server or network failures (they are recorded)."""
    path = "/v1/chat/completions" if endpoint is Endpoint.CHAT else "/v1/completions"
    rec = RequestRecord(
        plan.index, plan.adapter, plan.prompt_len, plan.max_tokens, time.perf_counter() - t0, scheduled_s
    )
    done = False
    try:
        async with client.stream("POST", path, json=body) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                return refused(rec, resp.status_code, await resp.aread(), t0)
            done = await read_events(rec, event_lines(resp), endpoint, t0)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        rec.error, rec.error_kind = f"{type(exc).__name__}: {exc}"[:500], TRANSPORT_ERROR
    return finish(rec, done, t0)
