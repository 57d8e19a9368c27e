"""What hostile request bodies cost a streaming tenant: `python -m switchboard.bench.hostile --model DIR`.

Starts `switchboard serve` in a process of its own on 127.0.0.1, streams one greedy completion alone (idle), then
again while three client threads send one kind of hostile body as fast as the server answers them: bodies over
`--max-request-bytes` (with Content-Length, and chunked), a body just under it holding a prompt of megabytes, deeply
nested JSON, and small requests with a bad parameter. Prints the stream's inter-token latency (p99 and max, ms)
beside the idle run, the ratio, and how many hostile requests were answered, with which statuses.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def _serve(model: Path, port: int, workdir: Path, flags: list[str]) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).with_name("switchboard")), "serve", "--model", str(model), "--port", str(port)]
    cmd += ["--store", str(workdir / "store"), *flags]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=workdir)
    for _ in range(1200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("switchboard serve did not answer /health")


def _gaps(url: str, model: str, tokens: int) -> list[float]:
    body = {"model": model, "prompt": "once upon a time", "max_tokens": tokens, "temperature": 0, "stream": True}
    body["ignore_eos"] = True
    stamps = []
    with httpx.Client(timeout=300) as http, http.stream("POST", f"{url}/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(stamps[1:])]


def _chunks(data: bytes, size: int = 65536) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _bodies(model: str, limit: int) -> dict[str, bytes]:
    return {
        "over the limit": json.dumps({"model": model, "prompt": "y" * (limit + 1024)}).encode(),
        "over the limit, chunked": json.dumps({"model": model, "prompt": "y" * (limit + 1024)}).encode(),
        "a prompt of megabytes": json.dumps({"model": model, "prompt": "z " * (limit // 2 - 1024)}).encode(),
        "nested JSON": ("[" * (limit // 4) + "]" * (limit // 4)).encode(),
        "small, bad parameter": json.dumps({"model": model, "prompt": "x", "temperature": -3}).encode(),
    }


def _attack(url: str, kind: str, body: bytes, stop: threading.Event, statuses: collections.Counter) -> None:
    headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=url, timeout=300) as http:
        while not stop.is_set():
            content = _chunks(body) if kind.endswith("chunked") else body
            try:
                statuses[http.post("/v1/completions", content=content, headers=headers).status_code] += 1
            except httpx.TransportError:
                statuses["closed"] += 1  # a 413 may close the connection before the body is sent


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokens", type=int, default=160, help="tokens of the measured stream")
    p.add_argument("--attackers", type=int, default=3)
    p.add_argument("--max-request-bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument("--port", type=int, default=8765)
    args = p.parse_args(argv)
    url = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        flags = ["--dtype", args.dtype, "--max-request-bytes", str(args.max_request_bytes)]
        server = _serve(args.model, args.port, Path(tmp), flags)
        try:
            model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            _gaps(url, model, 16)  # warm-up
            idle = _gaps(url, model, args.tokens)
            p99_idle = statistics.quantiles(idle, n=100)[98]
            print(f"inter-token latency of one stream of {args.tokens} tokens, {args.attackers} attacker threads")
            print(f"{'hostile bodies':<26} {'p99 ms':>8} {'max ms':>8} {'p99/idle':>9}  answered")
            print(f"{'none (idle)':<26} {p99_idle * 1e3:8.1f} {max(idle) * 1e3:8.1f} {1:9.2f}")
            for kind, body in _bodies(model, args.max_request_bytes).items():
                stop, statuses = threading.Event(), collections.Counter()
                attackers = [
                    threading.Thread(target=_attack, args=(url, kind, body, stop, statuses))
                    for _ in range(args.attackers)
                ]
                for attacker in attackers:
                    attacker.start()
                time.sleep(1.0)
                gaps = _gaps(url, model, args.tokens)
                stop.set()
                for attacker in attackers:
                    attacker.join()
                p99 = statistics.quantiles(gaps, n=100)[98]
                answered = ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items(), key=str))
                print(f"{kind:<26} {p99 * 1e3:8.1f} {max(gaps) * 1e3:8.1f} {p99 / p99_idle:9.2f}  {answered}")
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
