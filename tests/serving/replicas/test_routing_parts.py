"""The parts of `--replicas` that need no Ray: the affinity key of a request, the merged /metrics page, and a request
through an app in process. (The replicas themselves: test_replicas.py.)"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from switchboard.adapters_store.kinds.base import CONFIG_FILE, WEIGHTS_FILE
from switchboard.adapters_store.store import AdapterInfo, AdapterStore
from switchboard.serving.config import ServeConfig
from switchboard.serving.replicas.affinity import AffinityKeys
from switchboard.serving.replicas.asgi_call import HttpRequest, ResponseStart, call_asgi
from switchboard.serving.replicas.metrics_board import label_families, merge_families

INFO = AdapterInfo(kind="lora", rank=2, target_modules=["q_proj"], num_parameters=10)


def _commit(store: AdapterStore, owner: str, adapter_id: str, weights: bytes, **kw: bool) -> str:
    with store.staging() as staging:
        staging.write(CONFIG_FILE, iter([b"{}"]))
        staging.write(WEIGHTS_FILE, iter([weights]))
        return store.commit(staging, owner, adapter_id, INFO, **kw)[0].key


def _request(body: object, key: str | None = "ka", path: str = "/v1/completions") -> HttpRequest:
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return HttpRequest("POST", path, headers=headers, body=raw)


def test_affinity_key_is_tenant_and_version(tiny_model_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("ka alice admin\nkb bob\n")
    config = ServeConfig(model=tiny_model_dir, store=tmp_path / "store", api_keys=keys)
    router = AffinityKeys(config)
    store = AdapterStore(config.store)  # a replica's own view: what it commits, the router sees
    private = _commit(store, "alice", "mine", b"1")
    public = _commit(store, "alice", "ours", b"2", public=True)
    base = config.served_model_name

    assert router.key(_request({"model": "mine", "prompt": "x"})) == f"alice:{private}"
    assert router.key(_request({"model": base, "adapter_id": "mine", "prompt": "x"})) == f"alice:{private}"
    assert router.key(_request({"model": "ours", "prompt": "x"}, key="kb")) == f"bob:{public}"
    assert router.key(_request({"model": "ours", "prompt": "x"})) == f"alice:{public}"
    # The base model, and whatever the replica refuses, carry no key: the replica answers as one process would.
    assert router.key(_request({"model": base, "prompt": "x"})) == ""
    assert router.key(_request({"model": "mine", "prompt": "x"}, key="kb")) == ""  # bob's 404
    assert router.key(_request({"model": "mine", "prompt": "x"}, key="wrong")) == ""  # 401
    assert router.key(_request({"model": "mine", "prompt": "x"}, key=None)) == ""
    assert router.key(_request(b"{not json")) == ""
    assert router.key(_request([1, 2])) == ""
    assert router.key(_request({"model": ["mine"], "prompt": "x"})) == ""
    assert router.key(_request({"model": "mine"}, path="/v1/models")) == ""

    newer = _commit(store, "alice", "mine", b"3", overwrite=True)
    assert router.key(_request({"model": "mine", "prompt": "x"})) == f"alice:{newer}" != f"alice:{private}"
    store.delete("alice", "ours")
    assert router.key(_request({"model": "ours", "prompt": "x"}, key="kb")) == ""


def test_metrics_of_replicas_merge_into_one_page_labelled_by_replica() -> None:
    pages = []
    for replica, count in (("r1", 3), ("r2", 5)):
        registry = CollectorRegistry()
        Counter("switchboard_requests", "HTTP requests.", ["status"], registry=registry).labels("200").inc(count)
        pages.append(label_families(generate_latest(registry).decode(), replica))
    page = merge_families(pages).decode()
    assert page.count("# TYPE switchboard_requests_total counter") == 1
    samples = {
        (s.labels["replica"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
        if s.name == "switchboard_requests_total"
    }
    assert samples == {("r1", "200"): 3.0, ("r2", "200"): 5.0}


async def _events(_: Request) -> StreamingResponse:
    async def body():
        for i in range(3):
            yield f"data: {i}\n\n"
            await asyncio.sleep(0)

    return StreamingResponse(body(), media_type="text/event-stream")


async def _echo(request: Request) -> JSONResponse:
    return JSONResponse({"body": (await request.body()).decode(), "q": request.query_params.get("q")}, status_code=201)


def test_a_request_through_an_app_in_process_streams_its_parts() -> None:
    app = Starlette(routes=[Route("/events", _events), Route("/echo", _echo, methods=["POST"])])

    async def run(request: HttpRequest) -> list[ResponseStart | bytes]:
        return [part async for part in call_asgi(app, request)]

    start, *chunks = asyncio.run(run(HttpRequest("GET", "/events")))
    assert isinstance(start, ResponseStart) and start.status == 200
    assert dict(start.headers)[b"content-type"].startswith(b"text/event-stream")
    assert b"".join(chunks) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    start, body = asyncio.run(run(HttpRequest("POST", "/echo", query_string=b"q=7", body=b"hello")))
    assert start.status == 201 and json.loads(body) == {"body": "hello", "q": "7"}
