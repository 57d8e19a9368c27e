"""The engine requests behind one HTTP request: admitted together, merged into one stream, always closed.

A completions request with several prompts becomes one engine request per prompt (each with `n` choices); the
HTTP response numbers choices `prompt_index * n + choice`, as vLLM does. `Generation.start` admits every engine
request before the HTTP status is sent, so a full queue is still a clean 429; `Generation.aclose` closes every
engine generator, which aborts unfinished requests and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from starlette.requests import Request

from switchboard.serving.api.errors import RATE_LIMIT, SERVER_ERROR, ApiError, bad_request, internal_error
from switchboard.serving.engine.request import (
    EngineOverloaded,
    EngineUnavailable,
    FinishReason,
    RequestOutput,
    SamplingParams,
)
from switchboard.serving.metrics import GenerationTimer

T = TypeVar("T")


class GenerateFn(Protocol):
    """`AsyncEngine.generate`."""

    def __call__(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, adapter_id: str | None = None
    ) -> AsyncGenerator[RequestOutput, None]: ...


@dataclass(frozen=True, slots=True)
class ChoiceOutput:
    choice: int  # index of the choice in the HTTP response
    output: RequestOutput


class _Done:
    """Queue marker: one engine request has no more outputs."""


_DONE = _Done()


class Generation:
    def __init__(
        self,
        generate: GenerateFn,
        request_id: str,
        prompts: Sequence[list[int]],
        params: SamplingParams,
        adapter_id: str | None,
        timer: GenerationTimer,
    ) -> None:
        self._n = params.n
        self._params = params
        self._timer = timer
        self._prompt_lengths = [len(ids) for ids in prompts]
        self._streams = [
            generate(f"{request_id}-{i}" if len(prompts) > 1 else request_id, list(ids), params, adapter_id)
            for i, ids in enumerate(prompts)
        ]
        self._first: list[RequestOutput | None] = [None] * len(prompts)

    @property
    def prompt_tokens(self) -> int:
        return sum(self._prompt_lengths)

    @property
    def num_choices(self) -> int:
        return len(self._streams) * self._n

    async def start(self) -> None:
        """Submit every engine request and wait for each one's first output; 429 if the engine is overloaded."""
        try:
            if len(self._streams) == 1:
                results: list[RequestOutput | BaseException | None] = [await _first_output(self._streams[0])]
            else:
                results = await asyncio.gather(*map(_first_output, self._streams), return_exceptions=True)
        except (EngineOverloaded, EngineUnavailable, ValueError, KeyError) as exc:
            results = [exc]
        except BaseException:
            await self.aclose()
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.aclose()
            overloaded = [e for e in errors if isinstance(e, EngineOverloaded)]
            if overloaded:
                raise ApiError(
                    429,
                    str(overloaded[0]) + "; retry later.",
                    type=RATE_LIMIT,
                    code="queue_full",
                    headers={"Retry-After": str(max(1, overloaded[0].retry_after_s))},
                ) from overloaded[0]
            refused = next((e for e in errors if isinstance(e, ValueError)), None)
            if refused is not None:  # the engine refused the request itself (e.g. prompt + prefix past the context)
                raise bad_request(str(refused)) from refused
            missing = next((e for e in errors if isinstance(e, KeyError)), None)
            if missing is not None:  # the adapter version was deleted before the engine core parsed it
                raise ApiError(404, f"The adapter is gone: {missing.args[0]}", code="adapter_not_found") from missing
            raise _unavailable(errors[0]) if isinstance(errors[0], EngineUnavailable) else errors[0]
        self._first = [r for r in results if not isinstance(r, BaseException)]
        self._timer.admitted(self._prompt_lengths, self._params)

    async def outputs(self) -> AsyncGenerator[ChoiceOutput, None]:
        """Every output of every engine request, as they come; call `start` first.

        Closing this generator closes the engine requests too; a caller that may never start iterating must also
        call `aclose` (closing a generator that never started runs none of its code). A choice the engine ended with
        an error fails the whole HTTP request: `ApiError` 500 `internal_error` (its other choices are aborted).
        """
        source = self._single() if len(self._streams) == 1 else self._merged()
        try:
            async for prompt_index, output in source:
                choice = prompt_index * self._n + output.index
                if output.finish_reason is FinishReason.ERROR:
                    raise internal_error(f"Generation failed: {output.error}")
                self._timer.on_output(prompt_index, choice, output)
                yield ChoiceOutput(choice, output)
            self._timer.completed()
        except EngineUnavailable as exc:
            raise _unavailable(exc) from exc
        finally:
            await source.aclose()
            await self.aclose()

    async def _single(self) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        if self._first[0] is None:
            return
        yield 0, self._first[0]
        async for output in self._streams[0]:
            yield 0, output

    async def _merged(self) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        queue: asyncio.Queue[tuple[int, RequestOutput] | _Done | BaseException] = asyncio.Queue()
        firsts = [(i, first) for i, first in enumerate(self._first) if first is not None]
        pumps = [asyncio.create_task(_pump(i, self._streams[i], queue)) for i, _ in firsts]
        try:
            for first in firsts:
                yield first
            remaining = len(pumps)
            while remaining:
                item = await queue.get()
                if isinstance(item, _Done):
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def aclose(self) -> None:
        """Close every engine generator: unfinished requests are aborted. Safe to call more than once."""
        for stream in self._streams:
            with contextlib.suppress(RuntimeError):  # "already running": the task running it is closing it
                await stream.aclose()


def _unavailable(exc: EngineUnavailable) -> ApiError:
    return ApiError(503, f"The engine is not running: {exc}", type=SERVER_ERROR, code="engine_unavailable")


async def _first_output(stream: AsyncGenerator[RequestOutput, None]) -> RequestOutput | None:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None


async def _pump(
    prompt_index: int,
    stream: AsyncGenerator[RequestOutput, None],
    queue: asyncio.Queue[tuple[int, RequestOutput] | _Done | BaseException],
) -> None:
    try:
        async for output in stream:
            queue.put_nowait((prompt_index, output))
        queue.put_nowait(_DONE)
    except Exception as exc:
        queue.put_nowait(exc)


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (then raise `ClientDisconnected`).

    Used for non-streaming responses, where no write would notice the client is gone: cancelling the work closes
    the engine generators, which aborts their requests.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read: the server's next message is `http.disconnect` (client gone or response sent).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
