"""`switchboard serve --replicas 2` on the tiny model, as an operator runs it: a local Ray cluster, the router and two
replicas of one thread each behind Ray Serve's proxy, two tenants (`--api-keys`), one store directory.

One server serves the module, in order: an upload served by both replicas and a delete retiring it everywhere,
adapter affinity (8 adapters, each served by one replica; every key loaded once, from the replicas' own metrics), a
client leaving a stream, the loss of a replica under load, and last a clean stop of the whole Ray cluster.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from switchboard.adapters_store import synthetic
from switchboard.serving.cli import run_build_kernels

from ...serve_process import ServeProcess
from ..api.adapter_files import base_shape, upload

pytest.importorskip("ray.serve", reason="--replicas needs Ray Serve: pip install 'switchboard[ray]'")
pytestmark = pytest.mark.slow

REPLICA = "x-switchboard-replica"
ADMIN, TENANT = "key-admin", "key-tenant"
NUM_ADAPTERS = 8
LONG = 1900  # tokens: seconds of generation, were it left running after its client left
METRICS_PUSH_S = 1.5  # a replica pushes its series every second
STARTUP_TIMEOUT_S = 240  # a Ray cluster, the router and two replicas on two busy cores


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    workdir = tmp_path_factory.mktemp("replicas")
    keys = workdir / "keys.txt"
    keys.write_text(f"{ADMIN} alice admin\n{TENANT} bob\n")
    run_build_kernels()  # once here (or already in this session), rather than by both replicas at once
    flags = ("--replicas", "2", "--num-threads", "1", "--dtype", "float32", "--kv-cache-gb", "0.05")
    flags += ("--api-keys", str(keys), "--max-model-len", "2048")
    proc = ServeProcess(workdir, tiny_model_dir, *flags, startup_timeout_s=STARTUP_TIMEOUT_S)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def adapters(server: ServeProcess, tiny_model_dir: Path) -> list[str]:
    """Eight LoRA adapters of alice's, uploaded through the proxy."""
    base = base_shape(tiny_model_dir)
    names = [f"lora-{i}" for i in range(NUM_ADAPTERS)]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for i, name in enumerate(names):
            files = synthetic.lora_files(base, rank=2, modules=("q_proj", "v_proj"), seed=i, a_scale=0.5, b_scale=0.5)
            assert upload(http, name, files, key=ADMIN).status_code == 201
    return names


def complete(url: str, key: str, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "prompt": "hello", "max_tokens": 4, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def affinity_counts(url: str) -> dict[tuple[str, str], float]:
    """(replica, hit|load) -> count, from the proxy's /metrics (every replica's series, labelled)."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30).text
    pattern = r'switchboard_replica_adapter_requests_total\{replica="(\w+)",result="(\w+)"\} ([0-9.]+)'
    return {(r, result): float(v) for r, result, v in re.findall(pattern, text)}


def test_upload_is_served_by_both_replicas_and_delete_retires_it(server: ServeProcess, tiny_model_dir: Path) -> None:
    """A public adapter uploaded through the proxy, before any other adapter was used: alice's key for it goes to
    one replica, bob's to the other (the one holding no key), and both answer the same greedy tokens; deleted, it is
    gone for both tenants."""
    files = synthetic.lora_files(base_shape(tiny_model_dir), rank=2, modules=("q_proj", "v_proj"), seed=99)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert upload(http, "shared", files, key=ADMIN, public=True).status_code == 201
    first = complete(server.url, ADMIN, "shared", max_tokens=8)
    assert first.status_code == 200, first.text
    time.sleep(2)  # alice's key reaches Serve's routing table: bob's new key then goes to the replica without keys
    second = complete(server.url, TENANT, "shared", max_tokens=8)
    assert second.status_code == 200, second.text
    assert first.headers[REPLICA] != second.headers[REPLICA]  # both replicas of the two
    assert first.json()["choices"][0]["text"] == second.json()["choices"][0]["text"]

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=TENANT)
    assert "shared" in {m.id for m in client.models.list()}
    deleted = httpx.delete(f"{server.url}/v1/adapters/shared", headers={"Authorization": f"Bearer {ADMIN}"})
    assert deleted.status_code == 204
    for key in (ADMIN, TENANT):
        gone = complete(server.url, key, "shared")
        assert gone.status_code == 404
        assert gone.json()["error"]["code"] == "model_not_found"
    assert "shared" not in {m.id for m in client.models.list()}


def test_each_adapter_stays_on_one_replica(server: ServeProcess, adapters: list[str]) -> None:
    """Three rounds over 8 adapters, 4 requests at a time: each adapter's requests are answered by one replica, and
    the replicas' metrics show each adapter loaded once and every later request a hit."""
    time.sleep(METRICS_PUSH_S)  # the other replica's series are a push old: the last test's load must be in them
    before = _loads_and_hits(affinity_counts(server.url))
    order = [name for _ in range(3) for name in adapters]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda name: (name, complete(server.url, ADMIN, name)), order))
    served_by: dict[str, set[str]] = defaultdict(set)
    for name, response in responses:
        assert response.status_code == 200, response.text
        assert response.json()["model"] == name
        served_by[name].add(response.headers[REPLICA])
    assert all(len(replicas) == 1 for replicas in served_by.values()), dict(served_by)

    expected = (before[0] + NUM_ADAPTERS, before[1] + len(order) - NUM_ADAPTERS)
    deadline = time.monotonic() + 20  # each replica pushes its series every second
    while time.monotonic() < deadline:
        counts = affinity_counts(server.url)
        if sum(_loads_and_hits(counts)) >= sum(expected):
            break
        time.sleep(0.5)
    assert _loads_and_hits(counts) == expected, counts
    assert set().union(*served_by.values()) <= {r for r, _ in counts}


def _loads_and_hits(counts: dict[tuple[str, str], float]) -> tuple[float, float]:
    loads = sum(v for (_, result), v in counts.items() if result == "load")
    return loads, sum(counts.values()) - loads


def test_a_client_leaving_a_stream_ends_its_generation(server: ServeProcess, adapters: list[str]) -> None:
    """A client that leaves mid-stream cancels the call through the router: the replica aborts the request, which
    generates far fewer than its 1,900 tokens (the replicas' token counters say so once nothing runs)."""
    before = _metric_sum(server.url, "switchboard_generation_tokens_total")
    body = {"model": adapters[0], "prompt": "x", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.monotonic() + 60
    while _metric_sum(server.url, "switchboard_num_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(METRICS_PUSH_S)  # the other replica's series are a push old
    assert _metric_sum(server.url, "switchboard_num_requests_running") == 0
    assert _metric_sum(server.url, "switchboard_generation_tokens_total") - before < LONG / 2


def _metric_sum(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30).text
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} ([0-9.e+]+)$", text, flags=re.MULTILINE))


def test_killing_a_replica_loses_only_its_streams_in_flight(server: ServeProcess, adapters: list[str]) -> None:
    """Under load, one replica's process is killed: every non-streamed request is answered (200, retried on the
    other replica, or 503 with Retry-After); a stream cut short was on the killed replica and says so."""
    victim_id, victim_pid = next(iter(_replica_pids(server).items()))
    results: list[tuple[str, httpx.Response | str]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        name = adapters[i % len(adapters)]
        if i % 3 == 0:
            body = {"model": name, "prompt": "hello", "max_tokens": 48, "stream": True, "ignore_eos": True}
            headers = {"Authorization": f"Bearer {ADMIN}"}
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=120) as r:
                text = r.read().decode()
                with lock:
                    results.append((r.headers.get(REPLICA, ""), text if r.status_code == 200 else r))
            return
        response = complete(server.url, ADMIN, name, max_tokens=48, ignore_eos=True)
        with lock:
            results.append(("", response))

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(24)]
        time.sleep(1.0)
        psutil.Process(victim_pid).kill()
        for future in futures:
            future.result()

    answered = retried_away = 0
    for replica, result in results:
        if isinstance(result, str):  # a stream
            if result.rstrip().endswith("data: [DONE]"):
                continue
            assert replica == victim_id, result[-300:]
            assert '"code": "replica_unavailable"' in result or '"code":"replica_unavailable"' in result
        elif result.status_code == 200:
            answered += 1
            retried_away += result.headers[REPLICA] != victim_id
            assert result.json()["usage"]["completion_tokens"] == 48
        else:
            assert result.status_code == 503, result.text
            assert result.headers["retry-after"]
            assert result.json()["error"]["code"] == "replica_unavailable"
    assert answered > 0 and retried_away > 0
    after = complete(server.url, ADMIN, adapters[0])
    assert after.status_code == 200, after.text


def test_stop_shuts_ray_down(server: ServeProcess) -> None:
    """SIGTERM to `switchboard serve --replicas 2`: exit status 0, and every process of its Ray cluster is gone."""
    family = psutil.Process(server.proc.pid).children(recursive=True)
    assert any("ServeReplica" in " ".join(p.cmdline()) for p in family)
    server.stop(signal.SIGTERM)
    assert server.proc.returncode == 0, server.log.read_text()[-3000:]
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [p.cmdline() for p in alive]


def _replica_pids(server: ServeProcess, count: int = 2) -> dict[str, int]:
    """Replica id -> pid of `count` replicas alive now, from the line each logs when ready (Ray forwards a replica's
    output to the driver's log a little late)."""
    deadline = time.monotonic() + 30
    while True:
        found = re.findall(r"switchboard: replica (\w+) pid (\d+) ready", server.log.read_text())
        alive = {replica: int(pid) for replica, pid in found if psutil.pid_exists(int(pid))}
        if len(alive) >= count or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)
