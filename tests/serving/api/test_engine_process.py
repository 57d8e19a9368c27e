"""The engine core in its own process (serving/engine/core.py) against the in-process engine thread, over HTTP with
the real openai client: the same tokens and text (stop strings, n choices, logprobs, streamed or not); a stop
string found by the API process stops the core's generation for that choice; `kill -9` of the core fails requests
in flight and later ones with 503 and turns /health 503; `kill -9` of the server takes the core with it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from ...serve_process import ServeProcess, child_pids
from .conftest import RunningServer, ServerFactory

PROMPTS = ["Hello there", "The quick brown fox", "1 2 3"]


@pytest.fixture(scope="module")
def core(server_factory: ServerFactory) -> RunningServer:
    """`--engine-process on`; the session's `server` (the default, the engine in a thread) is the reference."""
    return server_factory(engine_process=True)


def _client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key="x", max_retries=0, timeout=60)


def _openai(body: dict[str, object]) -> dict[str, object]:
    """`ignore_eos` is our extension field: the openai client sends it in extra_body."""
    rest = {k: v for k, v in body.items() if k != "ignore_eos"}
    return {**rest, "extra_body": {"ignore_eos": body.get("ignore_eos", False)}}


def _choices(server: RunningServer, **body: object) -> list[tuple[str, str | None, int]]:
    with _client(server) as client:
        resp = client.completions.create(model=server.engine.model_name, **_openai(body))  # type: ignore[call-overload]
    assert resp.usage is not None
    return [(c.text, c.finish_reason, resp.usage.completion_tokens) for c in resp.choices]


def _streamed(server: RunningServer, **body: object) -> tuple[dict[int, str], dict[int, str | None]]:
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    with _client(server) as client:
        stream = client.completions.create(model=server.engine.model_name, stream=True, **_openai(body))  # type: ignore[call-overload]
        for chunk in stream:
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
                reasons[c.index] = c.finish_reason or reasons.get(c.index)
    return texts, reasons


def _stop_from(text: str) -> str:
    """A stop string that first occurs some way into `text` (so that the output stops early)."""
    stripped = text[4:]
    for length in (3, 2):
        for start in range(len(stripped) - length):
            candidate = stripped[start : start + length]
            if candidate.strip() and text.find(candidate) >= 4:
                return candidate
    pytest.skip("the tiny model's text has no usable stop string")


def test_the_core_process_serves_the_same_tokens_and_text(core: RunningServer, server: RunningServer) -> None:
    assert core.engine.config.engine_process and not server.engine.config.engine_process
    for prompt in PROMPTS:
        body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        plain = _choices(server, **body)
        assert _choices(core, **body) == plain
        stop = _stop_from(plain[0][0])
        stopped = {**body, "stop": [stop], "n": 2, "temperature": 0.8, "seed": 7, "logprobs": 2}
        expected = _choices(server, **stopped)
        assert _choices(core, **stopped) == expected
        assert _streamed(core, **stopped) == _streamed(server, **stopped)
    greedy_stop = {"prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    stop = _stop_from(_choices(server, **greedy_stop)[0][0])
    result = _choices(core, **greedy_stop, stop=[stop])
    assert result == _choices(server, **greedy_stop, stop=[stop])
    assert result[0][1] == "stop" and stop not in result[0][0] and result[0][2] < 24


# vLLM's sampling fields and structured output, each of which crosses the channel (parameters out, prompt logprobs
# back) or moves to the API process with the text (include_stop_str_in_output, min_tokens against stop strings).
FEATURES = [
    {"echo": True, "logprobs": 2, "max_tokens": 4},
    {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.4, "min_p": 0.05},
    {"logit_bias": {"5": 5.0, "9": -100}, "bad_words": ["the"], "temperature": 0.9, "seed": 11, "n": 2},
    {"allowed_token_ids": [5, 6, 7, 8, 9, 10], "skip_special_tokens": False},
    {"response_format": {"type": "json_object"}, "max_tokens": 40},
    {"guided_choice": ["red", "green", "blue"]},
]


@pytest.mark.parametrize("fields", FEATURES, ids=lambda f: "+".join(f))
def test_sampling_fields_and_grammars_through_the_core(
    core: RunningServer, server: RunningServer, fields: dict[str, object]
) -> None:
    body = {"prompt": PROMPTS[1], "max_tokens": 16, "temperature": 0, **fields}
    assert _raw(core, body) == _raw(server, body)


def test_stop_strings_with_min_tokens_and_include_stop_str(core: RunningServer, server: RunningServer) -> None:
    base = {"prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    text = _choices(server, **base)[0][0]
    stop = _stop_from(text)
    for extra in ({"include_stop_str_in_output": True}, {"min_tokens": 12}, {"min_tokens": 24}):
        body = {**base, "stop": [stop], **extra}
        assert _raw(core, body) == _raw(server, body), extra


def _raw(server: RunningServer, body: dict[str, object]) -> tuple[object, object]:
    """The choices and usage of a non-streamed completion (ids and timestamps differ between servers)."""
    response = httpx.post(f"{server.api_url}/completions", json={"model": server.engine.model_name, **body}, timeout=60)
    assert response.status_code == 200, response.text
    data = response.json()
    return data["choices"], data["usage"]


def test_a_stop_string_stops_the_core_generating(core: RunningServer) -> None:
    """The core does not check stop strings: the API process finds one and aborts that choice in the core, which
    frees its blocks at once (else it would run on to max_tokens, seconds on this model)."""
    body = {"prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    stop = _stop_from(_choices(core, **body)[0][0])
    result = _choices(core, **{**body, "max_tokens": 1500, "stop": [stop]})
    assert result[0][1] == "stop"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stats = core.engine.stats()
        if stats.num_running == 0 and stats.num_free_kv_blocks == stats.num_kv_blocks:
            return
        time.sleep(0.02)
    raise AssertionError(f"the core still runs the stopped request: {core.engine.stats()}")


def test_kill_9_of_the_core_fails_requests_with_503(server_factory: ServerFactory) -> None:
    doomed = server_factory(engine_process=True)
    pid = doomed.engine.core_pid
    assert pid is not None
    with _client(doomed) as client:
        stream = client.completions.create(
            model=doomed.engine.model_name, prompt="x", max_tokens=1500, stream=True, extra_body={"ignore_eos": True}
        )
        first = next(iter(stream))
        assert first.choices
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(openai.APIError) as raised:  # the stream ends with the error object
            for _ in stream:
                pass
        assert "engine" in str(raised.value.message).lower()
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model=doomed.engine.model_name, prompt="x", max_tokens=2)
    assert refused.value.status_code == 503
    assert refused.value.body["code"] == "engine_unavailable"  # type: ignore[index]
    health = httpx.get(f"{doomed.url}/health", timeout=10)
    assert health.status_code == 503 and health.json()["error"]["code"] == "engine_unavailable"


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_the_core_dies_with_the_server_on_kill_9(tiny_model_dir: Path, tmp_path: Path) -> None:
    flags = ("--engine-process", "on", "--dtype", "float32", "--device", "cpu", "--num-kv-blocks", "64")
    server = ServeProcess(tmp_path, tiny_model_dir, *flags)
    try:
        cores = [pid for pid in child_pids(server.pid) if _alive(pid)]
        assert cores, "the server has no engine core process"
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in cores) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in cores), "the engine core outlived its server"
    finally:
        server.stop()
