"""1,000 registered adapters, 8 device slots, 64 in host memory: requests spread uniformly over all of them complete,
and each answer equals what that adapter gives when run alone."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from safetensors.torch import save

from switchboard.adapters_store.kinds.base import CONFIG_FILE, WEIGHTS_FILE
from switchboard.adapters_store.store import AdapterInfo, AdapterStore

from .adapter_files import base_shape, lora_config, lora_tensors
from .conftest import ServerFactory

NUM_ADAPTERS = 1000
SLOTS = 8


def _fill_store(root: Path, model_dir: Path) -> None:
    shape = base_shape(model_dir)
    store = AdapterStore(root)
    config = json.dumps(lora_config(2)).encode()
    with store.batch():
        for i in range(NUM_ADAPTERS):
            tensors = lora_tensors(shape, rank=2, seed=i)
            with store.staging() as staging:
                staging.write(CONFIG_FILE, iter([config]))
                staging.write(WEIGHTS_FILE, iter([save(tensors)]))
                info = AdapterInfo("lora", 2, ["q_proj", "v_proj"], sum(t.numel() for t in tensors.values()))
                store.commit(staging, "default", f"a{i:04d}", info)


def _complete(http: httpx.Client, adapter_id: str) -> str:
    body = {"model": adapter_id, "prompt": "hello world", "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def test_a_thousand_adapters_over_eight_slots(
    server_factory: ServerFactory, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("store-1000")
    _fill_store(root, tiny_model_dir)
    server = server_factory(store=root, max_resident_adapters=SLOTS, max_host_adapters=64, max_num_seqs=16)
    ids = [f"a{i:04d}" for i in range(NUM_ADAPTERS)]
    random.Random(0).shuffle(ids)
    with httpx.Client(base_url=server.url, timeout=120, limits=httpx.Limits(max_connections=32)) as http:
        assert len(http.get("/v1/adapters").json()["data"]) == NUM_ADAPTERS
        with ThreadPoolExecutor(32) as pool:
            texts = dict(zip(ids, pool.map(lambda a: _complete(http, a), ids), strict=True))
        assert len(set(texts.values())) > NUM_ADAPTERS // 10  # the adapters differ, and they act
        for adapter_id in ids[:: NUM_ADAPTERS // 20]:  # each alone, with the slots now full of others
            assert _complete(http, adapter_id) == texts[adapter_id], adapter_id
        metrics = http.get("/metrics").text
    stats = server.engine.adapter_stats()
    assert stats.resident <= SLOTS and stats.evictions >= NUM_ADAPTERS - SLOTS
    assert 'switchboard_adapters_resident{tier="disk"} 1000.0' in metrics
    assert 'switchboard_adapter_requests_total{adapter="other"}' in metrics
