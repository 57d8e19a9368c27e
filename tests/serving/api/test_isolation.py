"""One tenant can never hurt another (issue 14), over HTTP against a real server: the attacker's request of
2026-12-04 (`top_p: 1e-300`) and a request on an adapter whose output overflows, sent while other tenants stream on
adapters of every kind. The attacks answer 200 (tiny top_p is legal) and 500 `internal_error` in OpenAI's shape (a
final chunk with `finish_reason: "error"` and the error object when streamed); every other stream completes normally
with the text it has when run alone."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save_file

from ...unbounded import served_bound_lifted
from .adapter_files import base_shape, lora_config, lora_tensors
from .conftest import RunningServer, ServerFactory

KEYS = {"alice": "key-alice", "bob": "key-bob", "mallory": "key-mallory"}
ADMIN_KEY = "key-ops"
# (tenant, adapter, route) of the streams the attacks must not disturb
STREAMS = [
    ("alice", "lora", "completions"),
    ("bob", "ia3", "chat"),
    ("alice", "prefix", "completions"),
    ("bob", "lokr-decomposed", "completions"),
    ("alice", None, "chat"),
]
MAX_TOKENS = 300
ATTACK = {"prompt": "x", "max_tokens": 2, "temperature": 1, "top_p": 1e-300}


def write_overflowing_lora(model_dir: Path, out: Path) -> Path:
    """A real PEFT LoRA whose weights are finite (1e30) but whose output overflows float32."""
    out.mkdir()
    tensors = {key: t.fill_(1e30) for key, t in lora_tensors(base_shape(model_dir)).items()}
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(lora_config()))
    return out


@pytest.fixture(scope="module")
def server(
    server_factory: ServerFactory, tiny_model_dir: Path, peft_adapters: dict[str, Path], tmp_path_factory
) -> RunningServer:
    root = tmp_path_factory.mktemp("isolation")
    keys = root / "api-keys"
    keys.write_text("".join(f"{key} {tenant}\n" for tenant, key in KEYS.items()) + f"{ADMIN_KEY} ops admin\n")
    # Registered like `serve --adapter`, with the served bound lifted: the point is the engine.
    overflow = write_overflowing_lora(tiny_model_dir, root / "overflow")
    adapters = {name: peft_adapters[name] for _, name, _ in STREAMS if name is not None}
    # The lifted bound is a patch in this process: the engine runs here (a thread, the default), not in a core process.
    with served_bound_lifted():
        return server_factory(api_keys=keys, adapters={**adapters, "overflow": overflow})


def _client(server: RunningServer, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key=KEYS[tenant], max_retries=0, timeout=120)


def _generate(server: RunningServer, tenant: str, adapter: str | None, route: str, stream: bool) -> tuple[str, str]:
    """Greedy text and finish reason of one request (streamed or not)."""
    model = adapter or server.engine.model_name
    extra = {"ignore_eos": True}
    common = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0, "extra_body": extra}
    with _client(server, tenant) as client:
        if route == "chat":
            messages = [{"role": "user", "content": f"tell {tenant} a story"}]
            if not stream:
                out = client.chat.completions.create(messages=messages, **common)
                return out.choices[0].message.content or "", out.choices[0].finish_reason
            parts, finish = [], ""
            for chunk in client.chat.completions.create(messages=messages, stream=True, **common):
                for choice in chunk.choices:
                    parts.append(choice.delta.content or "")
                    finish = choice.finish_reason or finish
            return "".join(parts), finish
        prompt = f"once upon a time {tenant}"
        if not stream:
            out = client.completions.create(prompt=prompt, **common)
            return out.choices[0].text, out.choices[0].finish_reason
        parts, finish = [], ""
        for chunk in client.completions.create(prompt=prompt, stream=True, **common):
            for choice in chunk.choices:
                parts.append(choice.text)
                finish = choice.finish_reason or finish
        return "".join(parts), finish


def _timed(fn, *args) -> tuple[object, float]:
    result = fn(*args)
    return result, time.monotonic()


def _events(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def test_attacks_fail_alone_while_other_tenants_stream(server: RunningServer) -> None:
    auth = {"Authorization": f"Bearer {KEYS['mallory']}"}
    with ThreadPoolExecutor(len(STREAMS)) as pool, httpx.Client(base_url=server.url, timeout=120, headers=auth) as http:
        streams = [pool.submit(_timed, _generate, server, *s, True) for s in STREAMS]
        deadline = time.monotonic() + 60
        while server.engine.stats().num_running < len(STREAMS):
            assert time.monotonic() < deadline and not any(f.done() for f in streams)
            time.sleep(0.01)

        # The request of 2026-12-04: legal, and answered normally.
        tiny = http.post("/v1/completions", json=ATTACK)
        assert tiny.status_code == 200, tiny.text
        assert tiny.json()["choices"][0]["finish_reason"] == "length"
        assert tiny.json()["usage"]["completion_tokens"] == 2

        # An adapter whose output overflows: 500 internal_error in OpenAI's shape.
        body = {"model": "overflow", "prompt": "hello", "max_tokens": 4}
        failed = http.post("/v1/completions", json=body)
        assert failed.status_code == 500
        error = failed.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "internal_error" and "not finite" in error["message"]

        # Streamed: a final chunk with finish_reason "error" and the error object, then [DONE].
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as streamed:
            assert streamed.status_code == 200
            events = _events(streamed)
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert [c["finish_reason"] for c in last["choices"]] == ["error"]
        assert last["error"]["code"] == "internal_error" and "not finite" in last["error"]["message"]

        # The openai client raises on the error object of a stream.
        with _client(server, "mallory") as client, pytest.raises(openai.APIError, match="not finite"):
            for _ in client.chat.completions.create(
                model="overflow", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
            ):
                pass
        attacks_done = time.monotonic()
        results = [f.result() for f in streams]

    for (text, finish), finished_at in results:
        assert finish == "length" and text
        assert finished_at > attacks_done  # each stream ran through every attack
    alone = [_generate(server, *s, False) for s in STREAMS]
    assert [r[0] for r in results] == alone
    # The two streams that failed after their 200 are counted as failures, by the error's status.
    exposition = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    errors = {
        (sample.labels["endpoint"], sample.labels["status"]): sample.value
        for family in text_string_to_metric_families(exposition)
        if family.name == "switchboard_stream_errors"
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert errors == {("/v1/completions", "500"): 1.0, ("/v1/chat/completions", "500"): 1.0}
