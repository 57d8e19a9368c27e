"""The load tester reads an event stream's lines as SSE ends them, and the server writes each event on one line to
every reader: a generated U+2028 inside an event's JSON cut it in two for httpx's aiter_lines (a soak failure)."""

from __future__ import annotations

import asyncio
import json

import httpx

from switchboard.loadtest.client import event_lines
from switchboard.serving.api.streaming import sse

TEXT = "a\u2028b\u2029c\x85d\x0be\nf\r\ng"


def test_an_event_is_one_line_for_str_splitlines() -> None:
    event = sse({"text": TEXT})
    assert event.endswith("\n\n") and len(event.rstrip("\n").splitlines()) == 1
    assert json.loads(event.removeprefix("data: "))["text"] == TEXT


def test_the_load_tester_splits_at_sse_line_ends_only() -> None:
    raw = f"data: {json.dumps({'text': TEXT}, ensure_ascii=False)}\r\n\r\ndata: [DONE]\n\n"  # as another server may
    chunks = [raw.encode()[i : i + 7] for i in range(0, len(raw.encode()), 7)]  # cut anywhere, UTF-8 included

    async def body():  # the bytes as the network might deliver them
        for chunk in chunks:
            yield chunk

    async def lines() -> list[str]:
        return [line async for line in event_lines(httpx.Response(200, content=body()))]

    got = asyncio.run(lines())
    assert [json.loads(line.removeprefix("data: "))["text"] for line in got if line.startswith("data: {")] == [TEXT]
    assert got[-2:] == ["data: [DONE]", ""]
