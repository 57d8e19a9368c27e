"""ServedAdapters' residency: one reference count (running sequences) decides what keeps a slot; waiting sequences
carry their adapter, so an adapter may leave the device and the registry while they wait and comes back on admission."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from switchboard.adapters_store import synthetic
from switchboard.adapters_store.kinds import Adapter, AdapterKind, BaseModelShape, load_adapter
from switchboard.kernels.backend import Backend, get_kernels
from switchboard.serving.adapters import ServedAdapters, UnknownAdapter
from switchboard.serving.engine.request import SamplingParams
from switchboard.serving.engine.sequence import Sequence
from switchboard.serving.models.linear import AdapterLinear

BASE = BaseModelShape(num_layers=1, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1, head_dim=8)


def _lora(tmp_path: Path, name: str, seed: int, rank: int = 4) -> Adapter:
    d = tmp_path / name.replace("/", "_")
    d.mkdir()
    for file, data in synthetic.lora_files(BASE, rank=rank, seed=seed).items():
        (d / file).write_bytes(data)
    return load_adapter(d, BASE, name)


def _served(startup: dict[str, Adapter], slots: int = 1) -> ServedAdapters:
    linears = [AdapterLinear(0, 16, {"q_proj": 16, "k_proj": 8, "v_proj": 8}), AdapterLinear(0, 16, {"o_proj": 16})]
    return ServedAdapters(
        startup, linears, slots, torch.float32, torch.device("cpu"), get_kernels(Backend.TORCH), code_lora_slots=False
    )


def _seq(adapter: Adapter) -> Sequence:
    return Sequence("r", 0, [1], SamplingParams(), None, adapter.name, adapter, adapter.kind)  # type: ignore[arg-type]


def test_a_held_slot_is_never_evicted_and_an_evicted_upload_leaves_the_registry(tmp_path: Path) -> None:
    served = _served({})
    a, b = _lora(tmp_path, "t/a", 1), _lora(tmp_path, "t/b", 2)
    runs_a, runs_b = _seq(served.resolve(a.name, a)), _seq(served.resolve(b.name, b))
    assert served.registered() == []  # an upload is registered when its sequence is admitted
    assert served.acquire(runs_a) and runs_a.adapter_slot == 0
    assert not served.acquire(runs_b)  # the only LoRA slot is held: b waits
    served.release(runs_a)
    assert served.acquire(runs_b) and runs_b.adapter_slot == 0
    assert served.registered() == ["t/b"]  # a was evicted with nothing running on it: it left
    assert served.acquire(runs_a) is False  # b holds the slot now
    assert served.registered() == ["t/b"]  # and a, waiting, is not registered again until it gets a slot
    served.release(runs_b)
    assert served.acquire(runs_a)  # a's sequence carried it: registered and loaded again
    assert served.is_resident("t/a") and not served.is_resident("t/b")
    stats = served.stats()
    assert (stats.loads, stats.evictions, stats.resident) == (3, 2, 1)
    assert torch.equal(served.layouts[AdapterKind.LORA].B[(0, "q_proj")][0, :, :4], a.weights[(0, "q_proj")][1])


def test_a_retired_version_leaves_when_its_last_sequence_stops(tmp_path: Path) -> None:
    served = _served({}, slots=2)
    old = _lora(tmp_path, "t/a@1", 1)
    first, second = _seq(served.resolve(old.name, old)), _seq(old)
    assert served.acquire(first) and served.acquire(second)
    served.retire(old.name)
    served.release(first)
    assert served.registered() == ["t/a@1"]  # second still runs on it
    served.release(second)
    assert served.registered() == [] and served.stats().resident == 0
    with pytest.raises(UnknownAdapter):
        served.resolve(old.name)


def test_start_up_adapters_stay_registered_when_evicted_or_retired(tmp_path: Path) -> None:
    a, b = _lora(tmp_path, "a", 1), _lora(tmp_path, "b", 2, rank=8)
    served = _served({"a": a, "b": b})
    seq_a, seq_b = _seq(a), _seq(b)
    assert served.acquire(seq_a)
    served.release(seq_a)
    served.retire("a")
    assert served.acquire(seq_b)  # evicts a
    assert sorted(served.registered()) == ["a", "b"] and served.resolve("a") is a
    assert served.layouts[AdapterKind.LORA].rank == 8  # the stacks grew to the largest registered rank
