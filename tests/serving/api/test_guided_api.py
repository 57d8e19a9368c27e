"""Structured output through the real HTTP server and the `openai` client: one mixed batch of every kind of
structured request (with and without adapters, n > 1, streamed) beside plain ones, each response parsed and
validated; bad specs answer 400 in OpenAI's shape; equal schemas compile once. Tiny model here; SmolLM2 in
test_guided_real_model.py."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from .conftest import RunningServer, ServerFactory

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
CHOICES = ["red", "green", "blue"]
REGEX = r"[A-Z][a-z]{1,6} [0-9]{2}"


@pytest.fixture(scope="module")
def guided_server(server_factory: ServerFactory, peft_adapters: dict[str, Path]) -> RunningServer:
    return server_factory(adapters={name: peft_adapters[name] for name in ("lora", "prefix", "ia3")})


def _requests(model: str) -> list[tuple[str, dict[str, Any], Any]]:
    """(endpoint, body, check) for each request of the batch; check(text) asserts what the output must be."""

    def schema(text: str) -> None:
        jsonschema.validate(json.loads(text), PERSON)

    def obj(text: str) -> None:
        assert isinstance(json.loads(text), dict)

    def choice(text: str) -> None:
        assert text in CHOICES

    def regex(text: str) -> None:
        assert re.fullmatch(REGEX, text), text

    chat = {"messages": [{"role": "user", "content": "A person, as JSON."}], "max_tokens": 96}
    person = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    out: list[tuple[str, dict[str, Any], Any]] = []
    for adapter in (model, "lora", "prefix"):
        out.append(("chat", {**chat, "model": adapter, "response_format": person}, schema))
        out.append(("chat", {**chat, "model": adapter, "response_format": person, "n": 2, "temperature": 1.0}, schema))
        out.append(("completions", {"model": adapter, "prompt": "def f(", "guided_json": PERSON}, schema))
        out.append(("completions", {"model": adapter, "prompt": "x", "guided_choice": CHOICES, "n": 3}, choice))
        out.append(("completions", {"model": adapter, "prompt": "Name:", "guided_regex": REGEX, "seed": 4}, regex))
        out.append(("chat", {**chat, "model": adapter, "guided_json": json.dumps(PERSON), "stream": True}, schema))
    out.append(("completions", {"model": "ia3", "prompt": "y", "structured_outputs": {"choice": CHOICES}}, choice))
    out.append(("chat", {**chat, "model": model, "max_tokens": 24, "temperature": 0}, None))
    out.append(("completions", {"model": "lora", "prompt": "import os", "max_tokens": 24, "n": 2}, None))
    out.append(
        ("completions", {"model": model, "prompt": "{", "response_format": {"type": "json_object"}, "seed": 0}, obj)
    )
    return out


def _call(client: openai.OpenAI, endpoint: str, body: dict[str, Any]) -> list[tuple[str, str]]:
    """Each choice's (text, finish_reason), through the openai client (extensions in extra_body)."""
    body = {"max_tokens": 64, **body}
    known = {"model", "messages", "prompt", "max_tokens", "n", "temperature", "seed", "response_format", "stream"}
    extra = {k: v for k, v in body.items() if k not in known}
    args = {k: v for k, v in body.items() if k in known}
    if endpoint == "chat":
        if args.pop("stream", False):
            texts: dict[int, str] = {}
            reasons: dict[int, str] = {}
            for chunk in client.chat.completions.create(**args, stream=True, extra_body=extra):
                for c in chunk.choices:
                    texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
                    reasons[c.index] = c.finish_reason or reasons.get(c.index)
            return [(texts[i], reasons[i]) for i in sorted(texts)]
        response = client.chat.completions.create(**args, extra_body=extra)
        return [(c.message.content or "", c.finish_reason) for c in response.choices]
    extra |= {"response_format": args.pop("response_format")} if "response_format" in args else {}
    response = client.completions.create(**args, extra_body=extra)
    return [(c.text, c.finish_reason) for c in response.choices]


def test_one_mixed_batch_every_response_validates(guided_server: RunningServer) -> None:
    model = guided_server.engine.model_name
    requests = _requests(model)
    with (
        openai.OpenAI(base_url=guided_server.api_url, api_key="x", max_retries=0, timeout=120) as client,
        ThreadPoolExecutor(max_workers=len(requests)) as pool,
    ):
        results = list(pool.map(lambda r: _call(client, r[0], r[1]), requests))
    for (endpoint, body, check), choices in zip(requests, results, strict=True):
        assert len(choices) == body.get("n", 1)
        for text, reason in choices:
            if check is None:
                continue
            assert reason == "stop", (endpoint, body, text)
            check(text)


def test_equal_schemas_compile_once(guided_server: RunningServer, http_guided: httpx.Client) -> None:
    schema = {"type": "object", "properties": {"k": {"enum": ["a", "b"]}}, "required": ["k"]}
    before = guided_server.engine.grammars.num_compiled
    for body in ({"guided_json": schema}, {"guided_json": json.dumps(schema, indent=4)}):
        r = http_guided.post("/v1/completions", json={"prompt": "z", "max_tokens": 16, **body})
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["choices"][0]["text"])["k"] in ("a", "b")
    assert guided_server.engine.grammars.num_compiled == before + 1


@pytest.fixture()
def http_guided(guided_server: RunningServer):
    with httpx.Client(base_url=guided_server.url, timeout=60) as c:
        yield c


BAD = [
    ({"guided_json": {"type": "nonsense"}}, "guided_json", "Unsupported type"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_regex": "([a-z]"}, "guided_regex", "parenthesis"),
    ({"guided_grammar": 'start ::= "a"'}, "guided_grammar", "root"),
    ({"guided_choice": []}, "guided_choice", "at least 1"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "Only one"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema.schema"),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"minLength": 3, "maxLength": 1, "type": "string"}},
            }
        },
        "response_format",
        "minLength",
    ),
    ({"response_format": {"type": "yaml"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "json_object"}, "guided_json": {}}, "guided_json", "Only one"),
    ({"structured_outputs": {"regex": "[^\\x00-\\U0010FFFF]"}}, "structured_outputs.regex", "matches no text"),
    ({"guided_whitespace_pattern": " *"}, "guided_whitespace_pattern", "not supported"),
]


@pytest.mark.parametrize(("extra", "param", "says"), BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_bad_specs_are_400_in_openais_shape(
    http_guided: httpx.Client, endpoint: str, extra: dict[str, Any], param: str, says: str
) -> None:
    base = {"prompt": "x"} if endpoint == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    r = http_guided.post(endpoint, json={**base, "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert says in error["message"]
    assert "/project/" not in error["message"]
