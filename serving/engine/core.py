"""The engine core: a process of its own that runs the scheduler, the model and the sampler, and nothing else.

In the API process the event loop parses JSON, streams SSE and detokenizes; here the step loop runs with a GIL
nobody else holds (as vLLM's V1 `EngineCore`). Requests arrive as token ids over a ZeroMQ PULL socket, outputs
leave as token ids over a PUSH socket (`wire.py`), and between steps the loop takes in every queued message without
waiting. An adapter a request names by store version (`owner/id@sha` and its directory) is parsed here, by a worker
thread into this process's own host cache, while the loop keeps stepping; its requests join the batch once it is
parsed. Start-up `--adapter` adapters load here with the model.

The process never outlives the server: a watchdog thread exits it as soon as its parent process is gone (also after
`kill -9` of the server, when no clean shutdown runs).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from switchboard.adapters_store.kinds import Adapter, AdapterError, load_adapter

from ..adapters import HostCache
from ..config import ServeConfig
from . import openmp, wire
from .llm_engine import LLMEngine
from .request import RequestOutput
from .wire import FromCore, Refusal, Snapshot, ToCore

log = logging.getLogger(__name__)

PARENT_CHECK_S = 0.2  # how often the watchdog looks for its parent
SNAPSHOT_INTERVAL_S = 0.02  # while stepping, counters go out with a step's outputs at most this often
PARSE_POLL_MS = 2  # while adapters are being parsed and nothing runs, how often the loop looks for them


@dataclass(slots=True)
class CoreAddresses:
    requests: str  # the API binds PUSH, the core connects PULL
    outputs: str  # the API binds PULL, the core connects PUSH


@dataclass(slots=True)
class _Parsing:
    """An ADD waiting for its adapter to be parsed."""

    message: list[Any]
    future: Future[Adapter]


def run_engine_core(config: ServeConfig, addresses: CoreAddresses, parent_pid: int) -> None:
    """The core process's entry point (multiprocessing, spawn): build the engine, report READY, serve until
    SHUTDOWN or until the parent is gone."""
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="parent-watchdog", daemon=True).start()
    # Ctrl-C reaches the whole process group: the server shuts the core down itself, in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s [core]: %(message)s")
    ctx = zmq.Context()
    requests = ctx.socket(zmq.PULL)
    requests.connect(addresses.requests)
    outputs = ctx.socket(zmq.PUSH)
    outputs.setsockopt(zmq.SNDHWM, 0)
    outputs.connect(addresses.outputs)
    try:
        core = EngineCore(config)
    except Exception as exc:  # start-up failed: the API process raises it (a bad --adapter: exit 2 with the reason)
        log.exception("the engine core could not start")
        usage = isinstance(exc, ValueError | FileNotFoundError | FileExistsError)  # what `serve` exits 2 for
        outputs.send(wire.pack([FromCore.FAILED, usage, f"{type(exc).__name__}: {exc}", str(exc)]))
        outputs.close(linger=2000)
        return
    outputs.send(wire.pack([FromCore.READY, core.info()]))
    # The loop runs in a second thread, as `--engine-process off` runs it: on this crowded 2-core machine the same
    # steps measured 8-10 tokens/s from a process's main thread and 61-69 from another thread (cause not known).
    loop = threading.Thread(target=core.serve, args=(requests, outputs), name="engine-core-loop")
    openmp.release_pool()  # the loader's OpenMP workers would throttle the loop thread's (openmp.py)
    try:
        loop.start()
        loop.join()
    finally:
        core.close()
        outputs.close(linger=1000)
        requests.close(linger=0)


def _exit_with_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:  # re-parented: the server died without shutting us down
            os._exit(1)
        time.sleep(PARENT_CHECK_S)


class EngineCore:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.engine = LLMEngine(config, detokenize=False)
        self._load_seconds: deque[float] = deque()  # parse times not yet reported (appended by the parse thread)
        self.host = HostCache(config.max_host_adapters, on_load=self._load_seconds.append)
        self._parser = openmp.serial_pool("core-parse")
        self._parsing: dict[str, _Parsing] = {}  # request id -> its ADD, waiting for the adapter
        self._adds_applied = 0
        self._last_snapshot = 0.0

    def info(self) -> dict[str, Any]:
        """What the API process needs to know once: READY's payload."""
        e = self.engine
        merged = e.merged_adapter
        kinds = {name: a.kind.value for name, a in e.adapters.items()}
        if merged is not None:
            kinds[merged.name] = merged.kind.value
        shape = e.base_shape
        return {
            "max_model_len": e.max_model_len,
            "base_shape": [getattr(shape, f) for f in shape.__dataclass_fields__],
            "base_weight_bytes": e.base_weight_bytes,
            "merged_adapter": None if merged is None else merged.name,
            "adapter_kinds": kinds,
            "vocab_size": e.model_config.vocab_size,  # the API compiles grammars too, to refuse bad ones with a 400
            "eos_token_ids": sorted(e.eos_token_ids),
            "snapshot": self.snapshot().to_wire(),
        }

    def close(self) -> None:
        self._parser.shutdown(wait=False, cancel_futures=True)

    # ---- the loop -------------------------------------------------------------------------------------------------
    def serve(self, requests: zmq.Socket, outputs: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(requests, zmq.POLLIN)
        while True:
            busy = self.engine.has_unfinished()
            timeout = 0 if busy else (PARSE_POLL_MS if self._parsing else None)
            took = False
            if poller.poll(timeout):
                while True:
                    try:
                        frame = requests.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    message = wire.unpack(frame)
                    if message[0] == ToCore.SHUTDOWN:
                        return
                    self._apply(message, outputs)
                    took = True
            took |= self._admit_parsed(outputs)
            if self.engine.has_unfinished():
                self._step(outputs)
            elif took or busy:  # idle now: the counters go out at once, so a scrape after the last token is exact
                self._send(outputs, [], force_snapshot=True)

    def _step(self, outputs: zmq.Socket) -> None:
        try:
            results = self.engine.step()
        except Exception as exc:  # no single sequence explains it (isolation.py): fail every request, not hang
            log.exception("engine step failed")
            for request_id in self.engine.request_ids():
                self._refuse(outputs, request_id, Refusal.FAILED, f"engine step failed: {exc}")
                self.engine.abort_request(request_id)
            return
        self._send(outputs, results, force_snapshot=not self.engine.has_unfinished())

    def _send(self, outputs: zmq.Socket, results: list[RequestOutput], *, force_snapshot: bool = False) -> None:
        now = time.monotonic()
        snapshot = None
        if force_snapshot or now - self._last_snapshot >= SNAPSHOT_INTERVAL_S:
            snapshot = self.snapshot().to_wire()
            self._last_snapshot = now
        if results or snapshot is not None:
            outputs.send(wire.pack([FromCore.OUTPUTS, [wire.output_to_wire(r) for r in results], snapshot]))

    def _refuse(self, outputs: zmq.Socket, request_id: str, why: Refusal, message: str) -> None:
        outputs.send(wire.pack([FromCore.REFUSED, request_id, why, message]))

    # ---- messages -------------------------------------------------------------------------------------------------
    def _apply(self, message: list[Any], outputs: zmq.Socket) -> None:
        kind = message[0]
        if kind == ToCore.ABORT:
            _, request_id, index = message
            if request_id in self._parsing and index is None:
                self._parsing.pop(request_id).future.cancel()
                self._adds_applied += 1
            self.engine.abort_request(request_id, index)
        elif kind == ToCore.RETIRE:
            self.host.drop(message[1])
            self.engine.retire_adapter(message[1])
        elif kind == ToCore.ADD:
            _, request_id, _, _, key, path, _ = message
            if key is None or path is None or key in self.engine.served_adapters.adapters:
                self._add(message, outputs, None)
            else:  # from the host cache or parsed, in the worker thread; the loop goes on stepping meanwhile
                loader = _loader(Path(path), self.engine, key)
                self._parsing[request_id] = _Parsing(message, self._parser.submit(self.host.get, key, loader))
        else:
            log.error("unknown message %r from the API process", kind)

    def _admit_parsed(self, outputs: zmq.Socket) -> bool:
        done = [rid for rid, p in self._parsing.items() if p.future.done()]
        for request_id in done:
            parsing = self._parsing.pop(request_id)
            try:
                adapter = parsing.future.result()
            except (FileNotFoundError, AdapterError) as exc:  # the version was deleted meanwhile, or is unreadable
                self._adds_applied += 1
                self._refuse(outputs, request_id, Refusal.UNKNOWN_ADAPTER, f"adapter {parsing.message[4]}: {exc}")
                continue
            except Exception as exc:
                log.exception("parsing adapter %s failed", parsing.message[4])
                self._adds_applied += 1
                self._refuse(outputs, request_id, Refusal.FAILED, f"the adapter could not be loaded: {exc}")
                continue
            self._add(parsing.message, outputs, adapter)
        return bool(done)

    def _add(self, message: list[Any], outputs: zmq.Socket, adapter: Adapter | None) -> None:
        _, request_id, prompt, params, key, _, tenant = message
        self._adds_applied += 1
        try:
            self.engine.add_request(
                request_id, prompt, wire.params_from_wire(params, self.engine.grammars.compile), key, adapter, tenant
            )
        except ValueError as exc:  # a bad request (400)
            self._refuse(outputs, request_id, Refusal.INVALID, str(exc))
        except KeyError as exc:  # an adapter this core does not hold (404)
            self._refuse(outputs, request_id, Refusal.UNKNOWN_ADAPTER, str(exc))
        except Exception as exc:  # this request alone cannot be added (e.g. its adapter fails to register)
            log.exception("adding request %s failed", request_id)
            self._refuse(outputs, request_id, Refusal.FAILED, f"the request could not be started: {exc}")

    # ---- counters -------------------------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        e = self.engine
        sched = e.scheduler
        waiting = list(sched.waiting)
        tenants = dict(Counter(s.tenant for s in waiting)) if self.config.api_keys is not None else {}
        h = self.host
        loads = [self._load_seconds.popleft() for _ in range(len(self._load_seconds))]
        return Snapshot(
            num_running=len(sched.running),
            num_waiting=len(waiting) + len(self._parsing),
            num_kv_blocks=e.blocks.num_blocks,
            num_free_kv_blocks=e.blocks.num_free,
            num_preemptions=e.stats().num_preemptions,
            adds_applied=self._adds_applied,
            waiting_by_tenant=tenants,
            adapters=e.adapter_stats(),
            host=[h.hits, h.misses, h.loads, h.evictions, len(h)],
            load_seconds=loads,
        )


def _loader(path: Path, engine: LLMEngine, key: str):
    return lambda: load_adapter(path, engine.base_shape, key)
