"""A client that sends a stream of hostile request bodies to a server while told to run.

Run as a script (`python hostile_client.py URL LIMIT [CONNECTIONS [KIND,...]]`) by test_hostile_bodies.py, in a
process of its own so that its work never competes with the server's for the GIL. LIMIT is the server's
--max-request-bytes. Each of CONNECTIONS (default 2) connections cycles through the hostile requests of every kind
(or of the KINDs named), one after another, each connection from a different point of the cycle. Commands on stdin,
one a line: `run`; `pause`, answered `paused` once every request in flight has its answer (the server is then idle
again); `quit`, answered with one JSON line: {kind: {status: count}}.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import httpx

PAUSE_S = 0.02  # between two requests of one connection
JSON = {"Content-Type": "application/json"}
Request = tuple[str, bytes | Callable[[], Iterator[bytes]]]  # route, body (or a generator of a chunked one)


def filled(prefix: str, unit: str, suffix: str, size: int) -> bytes:
    """`prefix + unit * k + suffix` with k as large as fits in `size` bytes."""
    room = size - len(prefix) - len(suffix)
    return (prefix + unit * (room // len(unit)) + suffix).encode()


def hostile_requests(limit: int) -> dict[str, list[Request]]:
    """kind -> the requests a connection of that kind cycles through."""
    over = filled('{"prompt": "', "x", '"}', 2 * limit)

    def chunked() -> Iterator[bytes]:
        for start in range(0, len(over), 65536):
            yield over[start : start + 65536]

    return {
        # Over the limit: 413, early.
        "over-limit-content-length": [("/v1/completions", over)],
        "over-limit-chunked": [("/v1/completions", chunked)],
        # At the limit: huge prompts, far past the context (400 context_length_exceeded).
        "max-size-text": [
            ("/v1/completions", filled('{"max_tokens": 1, "prompt": "', "hello world ", '"}', limit)),
        ],
        "max-size-chat": [
            (
                "/v1/chat/completions",
                filled('{"messages": [{"role": "user", "content": "', "hello world ", '"}]}', limit),
            )
        ],
        "max-size-token-ids": [("/v1/completions", filled('{"max_tokens": 1, "prompt": [', "5, ", "5]}", limit))],
        # Nested past the JSON parser's depth (400).
        "deeply-nested": [("/v1/completions", b'{"prompt": "x", "junk": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")],
        # Many tiny bad requests (400 each).
        "tiny-bad": [
            ("/v1/completions", b'{"prompt": '),
            ("/v1/completions", b'{"prompt": "x", "temperature": 9}'),
            ("/v1/chat/completions", b'{"messages": []}'),
            ("/v1/completions", b"[1, 2, 3]"),
            ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}'),
        ],
    }


class Attack:
    def __init__(self, url: str, limit: int, connections: int, kinds: list[str] | None) -> None:
        self.url = url
        self.running = threading.Event()
        self.lock = threading.Condition()
        self.in_flight = 0
        chosen = {k: r for k, r in hostile_requests(limit).items() if kinds is None or k in kinds}
        self.statuses: dict[str, Counter[str]] = {kind: Counter() for kind in chosen}
        # One cycle: the kinds in turn, each sending its next request (the tiny bad ones come round most often).
        self.cycle = [
            (kind, requests[round % len(requests)])
            for round in range(max(map(len, chosen.values())))
            for kind, requests in chosen.items()
        ]
        self.threads = [
            threading.Thread(target=self._connection, args=(i * len(self.cycle) // connections,), daemon=True)
            for i in range(connections)
        ]
        for thread in self.threads:
            thread.start()

    def _connection(self, start: int) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            for i in range(start, sys.maxsize):
                self.running.wait()
                with self.lock:
                    if not self.running.is_set():
                        continue
                    self.in_flight += 1
                kind, (route, body) = self.cycle[i % len(self.cycle)]
                try:
                    content = body() if callable(body) else body
                    self.statuses[kind][str(client.post(route, content=content, headers=JSON).status_code)] += 1
                except httpx.HTTPError as exc:
                    self.statuses[kind][type(exc).__name__] += 1
                with self.lock:
                    self.in_flight -= 1
                    self.lock.notify_all()
                time.sleep(PAUSE_S)

    def pause(self) -> None:
        with self.lock:
            self.running.clear()
            self.lock.wait_for(lambda: self.in_flight == 0)


def main() -> None:
    os.nice(19)  # it stands for clients on other machines: no CPU the server wants (on two cores, its torch threads)
    connections = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    attack = Attack(sys.argv[1], int(sys.argv[2]), connections, sys.argv[4].split(",") if len(sys.argv) > 4 else None)
    for line in sys.stdin:
        command = line.strip()
        if command == "run":
            attack.running.set()
        elif command == "pause":
            attack.pause()
            print("paused", flush=True)
        elif command == "quit":
            attack.pause()
            print(json.dumps({kind: dict(counts) for kind, counts in attack.statuses.items()}), flush=True)
            return


if __name__ == "__main__":
    main()
