"""Server-sent events for streamed completions: `data: {json}\\n\\n` chunks, then `data: [DONE]\\n\\n`.

`EventStreamResponse` guarantees the engine requests are closed however the stream ends (finished, client
disconnected, server shutting down): Starlette cancels a stream whose client is gone, which can leave the event
generator suspended; the response closes it, and the generation behind it, after the stream stops.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from switchboard.serving.api.errors import ApiError, internal_error
from switchboard.serving.api.generation import Generation
from switchboard.serving.api.responses import Delta, ResponseFormat, TokenTexts, usage

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


# JSON writes NEL, U+2028 and U+2029 raw inside strings. They do not end an SSE line, but Python's str.splitlines()
# breaks lines at them, and so does httpx's iter_lines, which many clients read event streams with: a generated U+2028
# cut an event's JSON in two. Written as JSON escapes, the event reads the same and is one line to every reader.
_LINE_BREAKS = {ord(c): f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"}


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':')).translate(_LINE_BREAKS)}\n\n"


class EventStreamResponse(StreamingResponse):
    def __init__(self, events: AsyncGenerator[str, None], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
            await self._on_close()


async def stream_events(
    generation: Generation,
    fmt: ResponseFormat,
    texts: TokenTexts,
    header: dict[str, Any],
    include_usage: bool,
    on_error: Callable[[ApiError], None] = lambda _: None,
) -> AsyncGenerator[str, None]:
    """The SSE events of one streamed response. `header` holds `id`, `object`, `created` and `model`; `on_error` is
    told of a failure that ends the stream with an error event (the metrics count it)."""
    chunk_header = {**header, "object": fmt.chunk_object}
    states = [fmt.new_state(i) for i in range(generation.num_choices)]
    for index in range(generation.num_choices):
        opening = fmt.opening_chunk_choice(index)
        if opening is not None:
            yield sse({**chunk_header, "choices": [opening]})
    try:
        async with aclosing(generation.outputs()) as outputs:
            async for item in outputs:
                delta = states[item.choice].update(item.output, texts)
                if delta.text or delta.finish_reason is not None or (fmt.wants_logprobs and delta.logprobs):
                    yield sse({**chunk_header, "choices": [fmt.chunk_choice(item.choice, delta)]})
    except Exception as exc:  # the status is sent: end every unfinished choice with "error" and the error object
        logger.exception("generation %s failed while streaming", header.get("id"))
        error = exc if isinstance(exc, ApiError) else internal_error(f"Generation failed: {type(exc).__name__}: {exc}")
        on_error(error)
        unfinished = [i for i, state in enumerate(states) if state.finish_reason is None]
        ended = [fmt.chunk_choice(i, Delta("", [], [], "error")) for i in unfinished]
        yield sse({**chunk_header, "choices": ended, **error.body()})
        yield DONE
        return
    if include_usage:
        completion_tokens = sum(state.completion_tokens for state in states)
        yield sse({**chunk_header, "choices": [], "usage": usage(generation.prompt_tokens, completion_tokens)})
    yield DONE
