"""The API process's side of the engine core process: `AsyncEngine`'s interface over ZeroMQ.

`EngineCoreClient` starts the core (`core.py`, a spawned process), waits for it to load the model, then sends
requests as token ids and reads outputs as token ids on the event loop, where `output_processor.py` adds their
text. The core's counters (engine stats, the adapter tiers) arrive with its outputs and when it goes idle; `stats()`
and `adapter_stats()` read the latest, and count the requests sent since as waiting, so the overload checks never
miss one. When the core dies, every request in flight fails with `EngineUnavailable` (503), `is_alive()` turns
false (`/health` answers 503), and new requests are refused the same way.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import zmq

from switchboard.adapters_store.kinds import BaseModelShape

from ..config import ServeConfig
from . import wire
from .async_engine import over_fair_share
from .core import CoreAddresses, run_engine_core
from .guided import GrammarCompiler
from .llm_engine import AdapterStats, EngineStats, load_tokenizer
from .output_processor import RequestTexts
from .request import AdapterInput, EngineOverloaded, EngineUnavailable, RequestOutput, SamplingParams
from .wire import FromCore, Refusal, Snapshot, ToCore

log = logging.getLogger(__name__)

STARTUP_POLL_MS = 200


class HostTier:
    """The core's host cache as the metrics see it (serving/adapters/metrics.py HostStats)."""

    def __init__(self) -> None:
        self.hits = self.misses = self.loads = self.evictions = self.size = 0
        self.on_load: Callable[[float], None] | None = None  # each parse's seconds (the metrics' histogram)

    def __len__(self) -> int:
        return self.size


class _Request:
    __slots__ = ("queue", "texts")

    def __init__(self, texts: RequestTexts) -> None:
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.texts = texts


class EngineCoreClient:
    # The API hands this engine an adapter's store directory, not the parsed adapter: the core parses it.
    adapter_input = AdapterInput.DIRECTORY

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.model_name: str = config.served_model_name or config.model.name
        self._dir = Path(tempfile.mkdtemp(prefix="switchboard-core-"))
        addresses = CoreAddresses(f"ipc://{self._dir}/requests", f"ipc://{self._dir}/outputs")
        self._zmq = zmq.Context()
        self._requests = self._zmq.socket(zmq.PUSH)
        self._requests.setsockopt(zmq.SNDHWM, 0)
        self._requests.bind(addresses.requests)
        self._outputs = self._zmq.socket(zmq.PULL)
        self._outputs.bind(addresses.outputs)
        self._send_lock = threading.Lock()  # routes send from the event loop, uploads retire from worker threads
        spawn = multiprocessing.get_context("spawn")
        self._process = spawn.Process(
            target=run_engine_core,
            args=(config, addresses, os.getpid()),
            name="switchboard-engine-core",
            daemon=True,
        )
        self._process.start()
        try:
            self.tokenizer = load_tokenizer(config.model)  # while the core imports torch and loads the model
            self._backend = self.tokenizer.backend_tokenizer
            info = self._wait_ready()
        except BaseException:
            self._stop_process()
            self._close_sockets()
            raise
        self.max_model_len: int = info["max_model_len"]
        self.base_shape = BaseModelShape(*info["base_shape"])
        self.base_weight_bytes: dict[str, int] = info["base_weight_bytes"]
        self.merged_adapter: str | None = info["merged_adapter"]
        self.adapter_kinds: dict[str, str] = info["adapter_kinds"]
        # The API compiles a request's grammar to answer a bad one with a 400; the core compiles it again by spec.
        self.grammars = GrammarCompiler(self.tokenizer, info["vocab_size"], info["eos_token_ids"])
        self.host_tier = HostTier()
        self._streams: dict[str, _Request] = {}
        self._adds_sent = 0
        self._unacknowledged: deque[tuple[int, str]] = deque()  # (add number, tenant) not yet taken in by the core
        self._pending_by_tenant: Counter[str] = Counter()
        self._snapshot = Snapshot()
        self._take_snapshot(info["snapshot"])
        self._reader: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead: str | None = None

    def _wait_ready(self) -> dict:
        while not self._outputs.poll(STARTUP_POLL_MS):
            if not self._process.is_alive():
                raise RuntimeError(f"the engine core exited during start-up (exit code {self._process.exitcode})")
        message = wire.unpack(self._outputs.recv())
        if message[0] == FromCore.FAILED:
            _, usage, described, text = message
            if usage:
                raise ValueError(text)  # what `switchboard serve` reports as a usage error (exit 2)
            raise RuntimeError(f"the engine core could not start: {described}")
        return message[1]

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start reading the core's outputs; call from inside the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._reader = self._loop.create_task(self._read_outputs())
        self._loop.add_reader(self._process.sentinel, self._on_core_exit)

    def shutdown(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._process.sentinel)
            self._loop.remove_reader(self._outputs.getsockopt(zmq.FD))
        if self._reader is not None:
            self._reader.cancel()
        if self._process.is_alive():
            self._send([ToCore.SHUTDOWN])
        self._stop_process()
        self._fail_all(RuntimeError("the server is shutting down"))
        self._close_sockets()

    def _stop_process(self) -> None:
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=10)

    def _close_sockets(self) -> None:
        self._requests.close(linger=0)
        self._outputs.close(linger=0)
        self._zmq.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    def is_alive(self) -> bool:
        return self._dead is None and self._process.is_alive()

    @property
    def core_pid(self) -> int | None:
        return self._process.pid

    def _on_core_exit(self) -> None:
        assert self._loop is not None
        self._loop.remove_reader(self._process.sentinel)
        self._process.join(timeout=1)
        self._dead = f"the engine core process exited (exit code {self._process.exitcode}); restart the server"
        log.error("%s", self._dead)
        self._fail_all(EngineUnavailable(self._dead))

    def _fail_all(self, exc: BaseException) -> None:
        for request in self._streams.values():
            request.queue.put_nowait(exc)

    # ---- API ------------------------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s = self._snapshot
        return EngineStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting + len(self._unacknowledged),
            num_kv_blocks=s.num_kv_blocks,
            num_free_kv_blocks=s.num_free_kv_blocks,
            num_preemptions=s.num_preemptions,
        )

    def adapter_stats(self) -> AdapterStats:
        return self._snapshot.adapters

    def refuses_kind(self, kind: str) -> str | None:
        """Why requests for adapters of `kind` cannot be served here (None: the core serves every kind)."""
        return None

    def retire_adapter(self, adapter_id: str) -> None:
        """An overwritten or deleted version: requests running on it finish, then it leaves the device."""
        self._send([ToCore.RETIRE, adapter_id])

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter_id: str | None = None,
        *,
        adapter: Path | None = None,
        tenant: str = "",
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; closing the iterator early aborts the request and frees its blocks.

        `adapter`: the store directory of the uploaded version `adapter_id` names (the core parses it there; a
        parsed adapter does not cross processes); `tenant`: for fair admission."""
        if not self.is_alive():
            raise EngineUnavailable(self._dead or "the engine is not running")
        if self.stats().num_waiting >= self.config.max_waiting or self._over_fair_share(tenant):
            raise EngineOverloaded(retry_after_s=1)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        path = None if adapter is None else str(adapter)
        params_wire = wire.params_to_wire(params)
        # Packed before anything is counted: a request that cannot be sent must not count as waiting forever.
        frame = wire.pack([ToCore.ADD, request_id, list(prompt_token_ids), params_wire, adapter_id, path, tenant])
        texts = RequestTexts(self._backend, prompt_token_ids, params, lambda index: self._abort(request_id, index))
        request = _Request(texts)
        self._streams[request_id] = request
        self._adds_sent += 1
        self._unacknowledged.append((self._adds_sent, tenant))
        self._pending_by_tenant[tenant] += 1
        self._send_frame(frame)
        remaining = params.n
        try:
            while remaining:
                item = await request.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                yield item
        finally:
            self._streams.pop(request_id, None)
            if remaining and self.is_alive():
                self._abort(request_id, None)

    def _abort(self, request_id: str, index: int | None) -> None:
        self._send([ToCore.ABORT, request_id, index])

    def _over_fair_share(self, tenant: str) -> bool:
        """As `AsyncEngine._over_fair_share`, over the core's waiting tenants plus the requests sent since."""
        if self.config.api_keys is None:
            return False
        counts = Counter(self._snapshot.waiting_by_tenant)
        counts.update(self._pending_by_tenant)
        return over_fair_share(tenant, counts, self.config.max_waiting)

    # ---- the wire -------------------------------------------------------------------------------------------------
    def _send(self, message: list) -> None:
        self._send_frame(wire.pack(message))

    def _send_frame(self, frame: bytes) -> None:
        with self._send_lock:
            self._requests.send(frame)

    async def _read_outputs(self) -> None:
        """Read the core's frames as they come (the socket's descriptor wakes the loop), deliver each output."""
        assert self._loop is not None
        ready = asyncio.Event()
        fd = self._outputs.getsockopt(zmq.FD)
        self._loop.add_reader(fd, ready.set)
        try:
            while True:
                # ZeroMQ's descriptor is edge-triggered: drain every frame before waiting on it again.
                while self._outputs.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self._on_frame(self._outputs.recv(zmq.NOBLOCK))
                ready.clear()
                if self._outputs.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    continue
                await ready.wait()
        finally:
            self._loop.remove_reader(fd)

    def _on_frame(self, frame: bytes) -> None:
        message = wire.unpack(frame)
        kind = message[0]
        if kind == FromCore.OUTPUTS:
            _, outputs, snapshot = message
            for item in outputs:
                request = self._streams.get(item[0])
                if request is None:
                    continue  # aborted meanwhile
                try:
                    out = request.texts.process(wire.output_from_wire(item))
                except Exception as exc:  # never let one request's output stop the reader
                    log.exception("processing an output of request %s failed", item[0])
                    request.queue.put_nowait(RuntimeError(f"processing the request's output failed: {exc}"))
                    continue
                if out is not None:
                    request.queue.put_nowait(out)
            if snapshot is not None:
                self._take_snapshot(snapshot)
        elif kind == FromCore.REFUSED:
            _, request_id, why, text = message
            request = self._streams.get(request_id)
            if request is not None:
                request.queue.put_nowait(_refusal(why, text))
        else:
            log.error("unexpected message %r from the engine core", kind)

    def _take_snapshot(self, values: list) -> None:
        s = Snapshot.from_wire(values)
        self._snapshot = s
        while self._unacknowledged and self._unacknowledged[0][0] <= s.adds_applied:
            _, tenant = self._unacknowledged.popleft()
            self._pending_by_tenant[tenant] -= 1
            if not self._pending_by_tenant[tenant]:
                del self._pending_by_tenant[tenant]
        h = self.host_tier
        h.hits, h.misses, h.loads, h.evictions, h.size = s.host
        if h.on_load is not None:
            for seconds in s.load_seconds:
                h.on_load(seconds)


def _refusal(why: int, text: str) -> BaseException:
    if why == Refusal.INVALID:
        return ValueError(text)
    if why == Refusal.UNKNOWN_ADAPTER:
        return KeyError(text)
    return RuntimeError(text)
