"""Every refusal in OpenAI's error shape, with the status codes of DESIGN.md section 2."""

from __future__ import annotations

import json

import openai
import pytest

from switchboard.serving.api.errors import ApiError, error_body
from switchboard.serving.api.prompts import completion_budget
from switchboard.serving.api.resolve import resolve_model


def assert_error_shape(
    body: dict, *, type_: str | None = None, code: str | None = None, param: str | None = None
) -> None:
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if type_ is not None:
        assert error["type"] == type_
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param


def test_unknown_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert_error_shape(info.value.response.json(), code="model_not_found", param="model")
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"


def test_unknown_adapter(client: openai.OpenAI, model_name: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model=model_name, prompt="x", max_tokens=2, extra_body={"adapter_id": "nope"})
    assert info.value.code == "adapter_not_found"
    assert_error_shape(info.value.response.json(), code="adapter_not_found", param="adapter_id")
    # adapter_id: null is the base model.
    ok = client.completions.create(model=model_name, prompt="x", max_tokens=2, extra_body={"adapter_id": None})
    assert ok.model == model_name


def test_prompt_past_context(client: openai.OpenAI, server, model_name: str) -> None:
    limit = server.engine.max_model_len
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_name, prompt=[5] * (limit - 4), max_tokens=16)
    assert info.value.code == "context_length_exceeded"
    message = info.value.response.json()["error"]["message"]
    assert f"maximum context length is {limit} tokens" in message and f"{limit + 12} tokens" in message
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_name, prompt=[5] * limit, max_tokens=1)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "word " * limit}])
    assert info.value.code == "context_length_exceeded"
    # Exactly at the limit is fine.
    resp = client.completions.create(
        model=model_name, prompt=[5] * (limit - 2), max_tokens=2, extra_body={"ignore_eos": True}
    )
    assert resp.usage.total_tokens == limit


def test_malformed_json(http) -> None:
    resp = http.post(
        "/v1/completions", content=b'{"prompt": "x", "max_tokens": ', headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 400
    assert_error_shape(resp.json(), type_="invalid_request_error")
    resp = http.post("/v1/chat/completions", content=b"[1, 2]", headers={"Content-Type": "application/json"})
    assert resp.status_code == 400
    assert_error_shape(resp.json(), type_="invalid_request_error")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "temperature": 5}, "temperature"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "logprobs": 50}, "logprobs"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "frequency_penalty": 2.5}, "frequency_penalty"),
        ({"max_tokens": 2}, "prompt"),
        # JSON types as the OpenAPI document states them, not pydantic's lax conversions.
        ({"prompt": "x", "max_tokens": "2"}, "max_tokens"),
        ({"prompt": "x", "n": True}, "n"),
        ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
        ({"prompt": "x", "stream": 0}, "stream"),
        ({"prompt": "x", "echo": 0}, "echo"),
        ({"prompt": "x", "temperature": "0.5"}, "temperature"),
    ],
)
def test_invalid_completion_fields(http, body: dict, param: str) -> None:
    resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 400, resp.text
    assert_error_shape(resp.json(), type_="invalid_request_error", param=param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1}, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ],
)
def test_invalid_chat_fields(http, body: dict, param: str) -> None:
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 400, resp.text
    assert_error_shape(resp.json(), type_="invalid_request_error", param=param)


def test_unknown_route_and_method(http) -> None:
    resp = http.get("/v1/nothing-here")
    assert resp.status_code == 404
    assert_error_shape(resp.json())
    resp = http.get("/v1/completions")
    assert resp.status_code == 405
    assert_error_shape(resp.json())
    # `Allow` names every method of the path, though each method is its own route.
    resp = http.put("/v1/adapters")
    assert resp.status_code == 405
    assert set(resp.headers["allow"].split(", ")) >= {"GET", "POST"}


def test_integral_floats_are_integers(http) -> None:
    """JSON Schema's integers include 2.0; the OpenAPI document says integer, so 2.0 is accepted."""
    resp = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2.0, "n": 1.0, "ignore_eos": True})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 2


def test_resolve_model_rules() -> None:
    known = {"fr-lora"}.__contains__
    assert resolve_model(None, None, base_model="base", adapter_exists=known).adapter_id is None
    assert resolve_model("base", None, base_model="base", adapter_exists=known).name == "base"
    by_model = resolve_model("fr-lora", None, base_model="base", adapter_exists=known)
    assert (by_model.adapter_id, by_model.name) == ("fr-lora", "fr-lora")
    assert resolve_model("base", "fr-lora", base_model="base", adapter_exists=known).adapter_id == "fr-lora"
    for model, adapter, code in [
        ("other", None, "model_not_found"),
        (None, "nope", "adapter_not_found"),
        ("other", "fr-lora", "model_not_found"),
    ]:
        with pytest.raises(ApiError) as info:
            resolve_model(model, adapter, base_model="base", adapter_exists=known)
        assert (info.value.status, info.value.code) == (404, code)


def test_completion_budget() -> None:
    assert completion_budget(10, None, 100, what="messages") == 90
    assert completion_budget(10, 90, 100, what="prompt") == 90
    for prompt_len, max_tokens in [(10, 91), (100, None), (120, None)]:
        with pytest.raises(ApiError) as info:
            completion_budget(prompt_len, max_tokens, 100, what="prompt")
        assert (info.value.status, info.value.code) == (400, "context_length_exceeded")


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
        ("/v1/completions", '{"prompt": ["fine", "\\udfff"], "max_tokens": 1}', "prompt"),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "a\\ud800"}], "max_tokens": 1}',
            "messages",
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}], "max_tokens": 1}',
            "messages",
        ),
        # Echoed in the "does not exist" message, these could not be encoded: 500, or a connection reset.
        ("/v1/completions", '{"prompt": "a", "model": "x\\ud800", "max_tokens": 1}', "model"),
        ("/v1/completions", '{"prompt": "a", "adapter_id": "\\udfff", "max_tokens": 1}', "adapter_id"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a"}], "user": "\\ud800"}', "user"),
    ],
)
def test_lone_surrogates_are_400(http, route: str, body: str, param: str) -> None:
    """A lone surrogate, sent as the JSON escape `\\ud800`, is a str UTF-8 cannot encode: it answered 500."""
    resp = http.post(route, content=body.encode(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert_error_shape(resp.json(), type_="invalid_request_error", param=param)
    assert "surrogate" in resp.json()["error"]["message"]


def test_an_error_message_echoing_a_lone_surrogate_still_renders() -> None:
    body = error_body("The adapter `a\ud800` does not exist.", type="not_found_error")
    assert body["error"]["message"] == "The adapter `a\\ud800` does not exist."
    assert json.dumps(body, ensure_ascii=False).encode("utf-8")


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_a_seed_out_of_range_is_400(http, seed: int) -> None:
    resp = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1, "seed": seed})
    assert resp.status_code == 400, resp.text
    assert_error_shape(resp.json(), type_="invalid_request_error", param="seed")


@pytest.mark.parametrize(("prompts", "n"), [(1025, 1), (600, 2)])  # the test server's --max-waiting is the default
def test_more_choices_than_the_queue_holds_are_refused_before_tokenizing(http, prompts: int, n: int) -> None:
    resp = http.post("/v1/completions", json={"prompt": ["a b c"] * prompts, "n": n, "max_tokens": 1})
    assert resp.status_code == 400, resp.text
    assert_error_shape(resp.json(), type_="invalid_request_error", param="prompt")
    assert f"{prompts * n} choices" in resp.json()["error"]["message"]
