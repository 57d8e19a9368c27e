"""`switchboard soak` (`make soak`): a bounded soak of one `switchboard serve` process and its adapter store.

The soak starts the server itself on 127.0.0.1 (with `--api-keys` for three tenants and `--store`), then keeps
`--concurrency` clients busy for `--duration` seconds with a seeded mix: well-formed completions and chats over the
base model and every adapter (the start-up ones and the tenants' uploads), streamed and whole, some cancelled by
the client mid-stream; good uploads of every kind; and hostile requests and uploads (`soak_actions.py` sends each,
`soak_cases.py` builds the hostile ones). Once, at `--kill-at` of the run, it kills the server with SIGKILL and
starts it again on the same port and store.

It fails (exit status 1) on any collateral failure (a well-formed request that did not complete, other than those
in flight at the kill), a hostile request answered 5xx, timed out or accepted, an acknowledged upload lost or
altered (the listing and the stored files' sha256 against the bytes sent, after the restart and at the end), the
server's RSS (its engine core process included) growing more than `--rss-limit` after its warm-up (per process:
the restart starts a new baseline), or requests or KV-cache blocks still held once every client is done. It prints
a line every `--progress-every` seconds, and writes soak.json (and soak.png: RSS and throughput over time) under
`--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import random
import secrets
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from switchboard.adapters_store.kinds.base import BaseModelShape

from .serve_process import ServeProcess, free_port
from .soak_actions import Actions
from .soak_cases import ADAPTERS, COMPLETIONS, SoakState, Upload, auth, demo_files
from .soak_report import Outcome, Result, RssSample, plot, read_rss, summarize, summary_lines

TENANTS = ("alice", "bob", "carol")
# A small KV cache, host tier and slot pool: RSS growth shows against a smaller base, and adapters churn through
# every tier. The caller's --serve-arg flags come after these and win.
SERVE_FLAGS = ("--kv-cache-gb", "0.25", "--max-host-adapters", "16", "--max-resident-adapters", "8")
MIX = {"generate": 52, "cancel": 8, "hostile": 22, "bad-upload": 7, "upload": 6, "list": 5}  # relative weights


@dataclass(slots=True)
class SoakConfig:
    model: Path
    adapters: dict[str, Path]  # started with the server (public); their kinds are the kinds under test
    out: Path = Path("bench-results/soak")
    duration_s: float = 600.0
    concurrency: int = 6
    kill_at: float | None = 0.5  # fraction of the duration; None: no kill
    warmup: float = 0.2  # fraction of the duration each server process runs before its RSS baseline
    rss_limit: float = 0.10
    request_timeout_s: float = 60.0
    progress_s: float = 15.0
    seed: int = 0
    max_request_bytes: int = 1 << 20
    max_adapter_bytes: int = 8 << 20
    serve_args: list[str] = field(default_factory=list)
    mix: dict[str, float] = field(default_factory=lambda: dict(MIX))  # action -> relative weight

    def __post_init__(self) -> None:
        if self.duration_s <= 0:
            raise ValueError("--duration must be positive")
        if not 1 <= self.concurrency <= 64:
            raise ValueError("--concurrency must lie in [1, 64]")
        if self.kill_at is not None and not 0 < self.kill_at < 1:
            raise ValueError("--kill-at is a fraction of the duration in (0, 1)")
        if not 0 <= self.warmup < 1 or self.rss_limit <= 0:
            raise ValueError("--warmup must lie in [0, 1) and --rss-limit be positive")
        if not self.adapters:
            raise ValueError("give the server's adapters: --adapter NAME=DIR (one of each kind)")
        if set(self.mix) - set(MIX) or any(w < 0 for w in self.mix.values()) or not any(self.mix.values()):
            raise ValueError(f"--mix takes ACTION=WEIGHT pairs over {', '.join(MIX)}, weights >= 0, not all 0")

    def to_json(self) -> dict[str, object]:
        out = {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]
        return {**out, "model": str(self.model), "out": str(self.out), "adapters": {k: str(v) for k, v in
                self.adapters.items()}, "serve_flags": list(SERVE_FLAGS)}  # fmt: skip


def _gauges(exposition: str) -> dict[str, float]:
    """Unlabelled `switchboard_*` samples of a Prometheus text page, by name without the prefix."""
    lines = (line.partition(" ") for line in exposition.splitlines() if line.startswith("switchboard_"))
    return {name.removeprefix("switchboard_"): float(value) for name, _, value in lines if "{" not in name}


class Soak:
    def __init__(self, cfg: SoakConfig) -> None:
        self.cfg = cfg
        self.workdir = (cfg.out / "server").resolve()  # the server runs there: its paths must not be relative
        base = BaseModelShape.from_hf_config(json.loads((cfg.model / "config.json").read_text()))
        demo = demo_files(cfg.adapters)
        keys = {tenant: f"soak-{tenant}-{secrets.token_hex(8)}" for tenant in TENANTS}
        self.admin_key = f"soak-admin-{secrets.token_hex(8)}"
        self.state = SoakState(keys, {adapter_id: kind for adapter_id, (kind, _) in demo.items()})
        limits = {"max_request_bytes": cfg.max_request_bytes, "max_adapter_bytes": cfg.max_adapter_bytes}
        self.actions = Actions(self.state, demo, base, **limits)
        self.port = free_port()
        self.results: list[Result] = []
        self.samples: list[RssSample] = []
        self.upload_checks: list[dict[str, object]] = []
        self.kill: dict[str, object] | None = None
        self.crash: str | None = None
        self.epoch = 0  # servers killed so far: a request that fails in a later epoch than it began was in flight
        self.in_flight = 0
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    # ---- the server --------------------------------------------------------------------------------------------
    def start_server(self) -> ServeProcess:
        keys = self.workdir / "keys.txt"
        lines = [f"{key} {tenant}" for tenant, key in self.state.keys.items()] + [f"{self.admin_key} ops admin"]
        keys.write_text("\n".join(lines) + "\n")
        flags = [*SERVE_FLAGS, "--api-keys", str(keys), "--log-level", "warning"]
        flags += ["--max-request-bytes", str(self.cfg.max_request_bytes)]
        flags += ["--max-adapter-bytes", str(self.cfg.max_adapter_bytes)]
        for name, path in self.cfg.adapters.items():
            flags += ["--adapter", f"{name}={path.resolve()}"]
        model = self.cfg.model.resolve()
        return ServeProcess(self.workdir, model, *flags, *self.cfg.serve_args, port=self.port, startup_timeout_s=300)

    async def open_clients(self) -> None:
        """One client per tenant (its key), one without a key (hostile probes send their own headers); new ones
        after a restart, so that no pooled connection of the killed server is reused."""
        for client in self.actions.clients.values():
            await client.aclose()
        limits = httpx.Limits(max_connections=self.cfg.concurrency + 2)
        timeout = httpx.Timeout(self.cfg.request_timeout_s)
        url = f"http://127.0.0.1:{self.port}"
        keys = {**self.state.keys, "": None, "admin": self.admin_key}
        self.actions.clients = {
            name: httpx.AsyncClient(base_url=url, headers=auth(key) if key else {}, timeout=timeout, limits=limits)
            for name, key in keys.items()
        }

    async def kill_and_restart(self, at_s: float) -> None:
        try:
            await self._kill_and_restart(at_s)
        except (RuntimeError, httpx.HTTPError) as exc:  # the restart failed: end the run
            self.crash = f"the restart failed: {exc}"[:2000]
            print(f"[soak] {self.crash}", flush=True)
            self.up.set()

    async def _kill_and_restart(self, at_s: float) -> None:
        await asyncio.sleep(max(0.0, at_s - self.now()))
        self.up.clear()
        self.epoch += 1
        in_flight, pending, pid = self.in_flight, dict(self.actions.pending), self.server.pid
        killed_at = self.now()
        self.server.stop(signal.SIGKILL)
        print(
            f"[soak] {killed_at:5.0f} s: kill -9 of the server (pid {pid}), {in_flight} request(s) in flight",
            flush=True,
        )
        self.server = await asyncio.to_thread(self.start_server)
        restarted = self.now()
        await self.open_clients()
        check = await self.check_uploads("after the restart", pending)
        print(
            f"[soak] {restarted:5.0f} s: restarted in {restarted - killed_at:.1f} s (pid {self.server.pid}); "
            f"{check['acknowledged']} acknowledged upload(s): {len(check['lost'])} lost, "
            f"{len(check['altered'])} altered; {len(check['adopted'])} of {len(pending)} in flight at the kill kept",
            flush=True,
        )
        self.kill = {"at_s": killed_at, "restarted_s": restarted, "pid": pid, "in_flight": in_flight}
        self.up.set()

    # ---- one action --------------------------------------------------------------------------------------------
    async def act(self, action: str, tenant: str, rng: random.Random) -> None:
        epoch, start = self.epoch, self.now()
        self.in_flight += 1
        try:
            answer = await self.actions.run(action, tenant, rng)
        finally:
            self.in_flight -= 1
        outcome = Outcome.KILLED if answer.outcome is Outcome.FAILED and self.epoch != epoch else answer.outcome
        self.results.append(Result(action, answer.case, tenant, start, self.now(), outcome, *answer[2:]))

    def _intact(self, up: Upload) -> bool:
        blob = self.workdir / "store" / "blobs" / up.sha256
        return all(
            (blob / name).is_file() and hashlib.sha256((blob / name).read_bytes()).hexdigest() == digest
            for name, digest in up.digests.items()
        )

    async def check_uploads(self, when: str, pending: dict[tuple[str, str], Upload]) -> dict[str, object]:
        """Every acknowledged upload listed at its version with its stored files' bytes unchanged; an upload in
        flight at the kill either absent or intact (then it counts as acknowledged); no other upload stored."""
        listed: dict[tuple[str, str], str] = {}
        for tenant in TENANTS:
            resp = await self.actions.clients[tenant].get(ADAPTERS)
            resp.raise_for_status()
            listed |= {(tenant, a["id"]): a["sha256"] for a in resp.json()["data"] if a.get("owner") == tenant}
        acked = self.state.acked

        def name(key: tuple[str, str]) -> str:
            return f"{key[0]}/{key[1]}"

        lost = [name(k) for k in acked if k not in listed]
        altered = [name(k) for k, up in acked.items() if k in listed and not (listed[k] == up.sha256 and
                   self._intact(up))]  # fmt: skip
        adopted = []
        for key, up in pending.items():
            if key in listed:
                if listed[key] == up.sha256 and self._intact(up):
                    adopted.append(name(key))
                    acked[key] = up
                else:
                    altered.append(f"{name(key)} (in flight at the kill)")
        unexpected = [name(k) for k in listed if k not in acked]
        check = {"when": when, "acknowledged": len(acked), "lost": lost, "altered": altered, "adopted": adopted}
        check["unexpected"] = unexpected
        self.upload_checks.append(check)
        return check

    async def check_usable(self) -> list[str]:
        """Each acknowledged upload answers a two-token completion for its owner."""
        gate = asyncio.Semaphore(self.cfg.concurrency)

        async def one(tenant: str, adapter_id: str) -> str | None:
            async with gate:
                body = {"model": adapter_id, "prompt": "soak", "max_tokens": 2, "temperature": 0}
                resp = await self.actions.clients[tenant].post(COMPLETIONS, json=body)
                return None if resp.status_code == 200 else f"{tenant}/{adapter_id}: HTTP {resp.status_code}"

        found = await asyncio.gather(*(one(t, i) for t, i in self.state.acked))
        return [x for x in found if x is not None]

    async def check_quiet(self) -> list[str]:
        """With every client done, the server holds no request and no KV-cache block (waits up to 15 s for it to
        notice the last disconnects)."""
        wanted = ("num_requests_running", "num_requests_waiting", "kv_cache_blocks_used")
        held: dict[str, float] = {}
        for _ in range(30):
            resp = await self.actions.clients["admin"].get("/metrics")
            resp.raise_for_status()
            values = _gauges(resp.text)
            held = {k: values[k] for k in wanted if values.get(k)}
            if not held:
                return []
            await asyncio.sleep(0.5)
        return [f"{k.replace('_', ' ')} = {v:g} with no request open" for k, v in held.items()]

    # ---- the run -----------------------------------------------------------------------------------------------
    async def worker(self, n: int) -> None:
        rng = random.Random(self.cfg.seed * 1009 + n)
        actions, weights = list(self.cfg.mix), list(self.cfg.mix.values())
        while True:
            await self.up.wait()
            if self.now() >= self.cfg.duration_s or self.crash:
                return
            await self.act(rng.choices(actions, weights)[0], rng.choice(TENANTS), rng)

    async def monitor(self, done: asyncio.Event) -> None:
        """RSS once a second; a progress line every --progress-every seconds; a server that exits by itself ends
        the run."""
        next_line = self.cfg.progress_s
        while not done.is_set():
            t, server = self.now(), self.server
            if server.proc.poll() is not None and self.up.is_set():
                self.crash = f"the server exited by itself with status {server.proc.returncode} at {t:.0f} s"
                print(f"[soak] {self.crash}", flush=True)
            elif (rss := read_rss(server.pid)) is not None and server.proc.poll() is None:
                self.samples.append(RssSample(t, server.pid, rss))
            if t >= next_line:
                self.progress(t)
                next_line += self.cfg.progress_s
            await asyncio.sleep(1.0)

    def progress(self, t: float) -> None:
        tally = {o: 0 for o in Outcome}
        for r in self.results:
            tally[r.outcome] += 1
        recent = sum(
            r.tokens for r in self.results if r.outcome is Outcome.COMPLETED and r.end_s > t - self.cfg.progress_s
        )
        own = [s for s in self.samples if s.pid == self.server.pid]
        rss = f"{own[-1].rss_bytes / 2**20:.0f} MiB" if own else "-"
        print(
            f"[soak] {t:5.0f}/{self.cfg.duration_s:.0f} s: completed {tally[Outcome.COMPLETED]}, refused "
            f"{tally[Outcome.REFUSED]}, cancelled {tally[Outcome.CANCELLED]}, failed {tally[Outcome.FAILED]}, "
            f"killed {tally[Outcome.KILLED]}; {recent / self.cfg.progress_s:.1f} tok/s; "
            f"{len(self.state.acked)} uploads acknowledged; server RSS {rss}",
            flush=True,
        )

    async def run(self) -> dict[str, object]:
        cfg = self.cfg
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True)
        self.up = asyncio.Event()
        self.server = await asyncio.to_thread(self.start_server)
        await self.open_clients()
        models = (await self.actions.clients[TENANTS[0]].get("/v1/models")).json()["data"]
        self.state.base_model = next(m["id"] for m in models if not m.get("parent"))
        print(
            f"[soak] {self.server.url} (pid {self.server.pid}): {cfg.concurrency} clients for {cfg.duration_s:.0f} s, "
            f"tenants {', '.join(TENANTS)}, adapters {', '.join(f'{i} ({k})' for i, k in self.state.public.items())}"
            + (f"; kill -9 at {cfg.kill_at * cfg.duration_s:.0f} s" if cfg.kill_at else ""),
            flush=True,
        )
        self.t0 = self.actions.t0 = time.perf_counter()
        self.up.set()
        done = asyncio.Event()
        monitor = asyncio.create_task(self.monitor(done))
        setup = random.Random(cfg.seed)
        await asyncio.gather(*(self.act("upload", tenant, setup) for tenant in TENANTS))  # one upload each first
        killer = asyncio.create_task(self.kill_and_restart(cfg.kill_at * cfg.duration_s)) if cfg.kill_at else None
        await asyncio.gather(*(self.worker(n) for n in range(cfg.concurrency)))
        if killer is not None:
            if self.crash:
                killer.cancel()
            await asyncio.gather(killer, return_exceptions=True)
        ended = self.now()
        done.set()
        await monitor
        leaks: list[str] = []
        if not self.crash:
            try:
                leaks = await self.check_quiet()
                final = await self.check_uploads("at the end", {})
                final["unusable"] = await self.check_usable()
            except httpx.HTTPError as exc:
                leaks = [f"the server did not answer the final checks ({type(exc).__name__}: {exc})"]
        for client in self.actions.clients.values():
            await client.aclose()
        self.server.stop()
        problems = [self.crash] if self.crash else []
        if cfg.kill_at and self.kill is None and not self.crash:
            problems.append("the kill and restart did not happen")
        print(f"[soak] load ended at {ended:.0f} s; checks done at {self.now():.0f} s", flush=True)
        return problems + [f"at the end: {leak}" for leak in leaks]


def run(cfg: SoakConfig) -> int:
    """The soak, then soak.json and soak.png under --out and the summary; 0 when it passed, 1 otherwise."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would drown the progress lines
    soak = Soak(cfg)
    problems = asyncio.run(soak.run())
    summary = summarize(cfg.to_json(), soak.results, soak.samples, soak.upload_checks, soak.kill, problems)
    path = cfg.out / "soak.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    png = plot(summary, cfg.out / "soak.png")
    for line in summary_lines(summary):
        print(line, flush=True)
    print(f"[soak] summary: {path}, {png}; server log: {soak.workdir / 'serve.log'}", flush=True)
    return 0 if summary["verdict"]["passed"] else 1  # type: ignore[index]


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter expects NAME=DIR, got {spec!r}")
        adapters[name] = Path(path)
    return adapters


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for pair in text.split(","):
        action, sep, weight = pair.partition("=")
        try:
            mix[action.strip()] = float(weight)
        except ValueError as exc:
            raise ValueError(f"--mix expects ACTION=WEIGHT pairs, got {pair!r}") from exc
        if not sep:
            raise ValueError(f"--mix expects ACTION=WEIGHT pairs, got {pair!r}")
    return mix


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="the base model directory the server loads")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="a start-up adapter (repeat)")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    p.add_argument("--concurrency", type=int, default=6, help="clients, each with one request at a time")
    p.add_argument("--kill-at", type=float, default=0.5, help="kill -9 and restart at this fraction of the run")
    p.add_argument("--no-kill", action="store_true", help="no kill and restart")
    p.add_argument("--warmup", type=float, default=0.2, help="fraction of the run before each RSS baseline")
    p.add_argument("--rss-limit", type=float, default=0.10, help="largest RSS growth after warm-up (0.10: 10%%)")
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds a request may wait for a byte")
    p.add_argument("--progress-every", type=float, default=15.0, help="seconds between progress lines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, help="the server's limit (and the probes')")
    p.add_argument("--max-adapter-bytes", type=int, default=8 << 20, help="the server's upload limit")
    p.add_argument(
        "--mix",
        default=",".join(f"{action}={weight}" for action, weight in MIX.items()),
        help="relative weights of the actions (default %(default)s); e.g. generate=1,upload=1 isolates two",
    )
    p.add_argument("--serve-arg", action="append", default=[], metavar="FLAG", help="passed to switchboard serve")
    p.add_argument("--out", type=Path, default=Path("bench-results/soak"), help="soak.json, soak.png, server/")


def config_from_args(args: argparse.Namespace) -> SoakConfig:
    return SoakConfig(
        model=args.model,
        adapters=parse_adapters(args.adapter),
        out=args.out,
        duration_s=args.duration,
        concurrency=args.concurrency,
        kill_at=None if args.no_kill else args.kill_at,
        warmup=args.warmup,
        rss_limit=args.rss_limit,
        request_timeout_s=args.request_timeout,
        progress_s=args.progress_every,
        seed=args.seed,
        max_request_bytes=args.max_request_bytes,
        max_adapter_bytes=args.max_adapter_bytes,
        serve_args=args.serve_arg,
        mix=parse_mix(args.mix),
    )
