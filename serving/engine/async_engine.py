"""The engine behind the HTTP server: one background thread steps `LLMEngine`; asyncio callers stream outputs.

Torch releases the GIL inside its kernels, so the event loop keeps answering HTTP while a step runs. Commands
(add, abort) cross into the step thread through a queue and are applied between steps; outputs cross back with
`loop.call_soon_threadsafe` into one asyncio queue per request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

from switchboard.adapters_store.kinds import Adapter

from ..config import ServeConfig
from . import openmp
from .llm_engine import AdapterStats, EngineStats, LLMEngine
from .request import AdapterInput, EngineOverloaded, RequestOutput, SamplingParams

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: str | None
    adapter: Adapter | None
    tenant: str


@dataclass(slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _Retire:
    adapter_id: str


def over_fair_share(tenant: str, waiting: Counter[str], max_waiting: int) -> bool:
    """Whether `tenant` holds its share of a queue at least half full: `waiting` counts each tenant's waiting
    requests; the share is max_waiting / (n + 1), n the tenants waiting (with this one)."""
    if waiting.total() < max_waiting / 2:
        return False
    return waiting[tenant] >= max_waiting / (len(set(waiting) | {tenant}) + 1)


class AsyncEngine:
    adapter_input = AdapterInput.PARSED  # uploads reach the step thread parsed (the API's host tier)
    host_tier = None  # the API's host cache is the host tier

    def __init__(self, config: ServeConfig, engine: LLMEngine | None = None) -> None:
        self.config = config
        self.engine = engine or LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self.model_name: str = config.served_model_name or config.model.name
        self.max_model_len = self.engine.max_model_len
        self.base_shape = self.engine.base_shape
        self.base_weight_bytes = self.engine.base_weight_bytes
        self.grammars = self.engine.grammars
        merged = self.engine.merged_adapter
        self.merged_adapter: str | None = None if merged is None else merged.name
        self.adapter_kinds: dict[str, str] = {name: a.kind.value for name, a in self.engine.adapters.items()}
        if merged is not None:
            self.adapter_kinds[merged.name] = merged.kind.value
        self._commands: queue.SimpleQueue[_Add | _Abort | _Retire | None] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._pending_adds = 0  # requests sent to the step thread and not yet queued by the scheduler
        self._pending_by_tenant: Counter[str] = Counter()
        self._pending_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the step thread; call from inside the running event loop."""
        self._loop = asyncio.get_running_loop()
        openmp.release_pool()  # the loader's OpenMP workers would throttle the step thread's (openmp.py)
        self._thread = threading.Thread(target=self._run, name="switchboard-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stopping.set()
        self._commands.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
        for stream in self._streams.values():  # nobody will step these again: end their callers' waits
            stream.put_nowait(RuntimeError("the server is shutting down"))

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- API ------------------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s = self.engine.stats()
        s.num_waiting += self._pending_adds
        return s

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter_id: str | None = None,
        *,
        adapter: Adapter | None = None,
        tenant: str = "",
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; closing the iterator early aborts the request and frees its blocks.

        `adapter`: the parsed adapter `adapter_id` names, when the engine may not hold it (uploads: the host tier
        hands it over; its sequences carry it and it is registered when they are admitted); `tenant`: for fair
        admission."""
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the engine is not running")
        if self.stats().num_waiting >= self.config.max_waiting or self._over_fair_share(tenant):
            raise EngineOverloaded(retry_after_s=1)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = stream
        with self._pending_lock:
            self._pending_adds += 1
            self._pending_by_tenant[tenant] += 1
        self._commands.put(_Add(request_id, list(prompt_token_ids), params, adapter_id, adapter, tenant))
        remaining = params.n
        try:
            while remaining:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                yield item
        finally:
            self._streams.pop(request_id, None)
            if remaining:
                self._commands.put(_Abort(request_id))

    def _over_fair_share(self, tenant: str) -> bool:
        """With tenants (`--api-keys`), once the queue is half full no tenant may hold more than max_waiting / (n + 1)
        of it, n the tenants waiting: a flood from one tenant meets 429 while the others still get in."""
        if self.config.api_keys is None:
            return False
        counts = Counter(seq.tenant for seq in list(self.engine.scheduler.waiting))
        with self._pending_lock:
            counts.update(self._pending_by_tenant)
        return over_fair_share(tenant, counts, self.config.max_waiting)

    def refuses_kind(self, kind: str) -> str | None:
        """Why requests for adapters of `kind` cannot be served here (None: every kind is)."""
        return None

    def retire_adapter(self, adapter_id: str) -> None:
        """An overwritten or deleted version: requests running on it finish, then it leaves the device."""
        self._commands.put(_Retire(adapter_id))

    def adapter_stats(self) -> AdapterStats:
        return self.engine.adapter_stats()

    # ---- the step thread ------------------------------------------------------------------------------------
    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(item)

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._deliver(out.request_id, out)

    def _send(self, request_id: str, item: RequestOutput | BaseException) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, request_id, item)

    def _apply(self, cmd: _Add | _Abort | _Retire) -> None:
        if isinstance(cmd, _Abort):
            self.engine.abort_request(cmd.request_id)
            return
        if isinstance(cmd, _Retire):
            self.engine.retire_adapter(cmd.adapter_id)
            return
        try:
            self.engine.add_request(
                cmd.request_id, cmd.prompt_token_ids, cmd.params, cmd.adapter_id, cmd.adapter, cmd.tenant
            )
        except (ValueError, KeyError) as exc:  # refused: a bad request (400) or an unknown adapter (404)
            self._send(cmd.request_id, exc)
        except Exception as exc:  # this request alone cannot be added (e.g. its adapter fails to register)
            log.exception("adding request %s failed", cmd.request_id)
            self._send(cmd.request_id, RuntimeError(f"the request could not be started: {exc}"))
        finally:  # counted as pending until the scheduler holds it, so admission checks never miss it
            with self._pending_lock:
                self._pending_adds -= 1
                self._pending_by_tenant[cmd.tenant] -= 1
                if not self._pending_by_tenant[cmd.tenant]:
                    del self._pending_by_tenant[cmd.tenant]

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        while not self._stopping.is_set():
            # Block for a command only when there is nothing to step.
            block = not self.engine.has_unfinished()
            while True:
                try:
                    cmd = self._commands.get(block=block)
                except queue.Empty:
                    break
                if cmd is None:
                    return
                self._apply(cmd)
                block = False
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # no single sequence explains it (isolation.py): fail every caller, not hang
                log.exception("engine step failed")
                for request_id in list(self._streams):
                    self._send(request_id, RuntimeError(f"engine step failed: {exc}"))
                    self.engine.abort_request(request_id)
                continue
            if outputs:  # one wake-up of the event loop per step, not one per output (it then takes the GIL once)
                loop.call_soon_threadsafe(self._deliver_all, outputs)
