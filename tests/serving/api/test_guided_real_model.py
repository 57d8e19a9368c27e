"""Structured output on the real model (SmolLM2-135M-Instruct, $SWITCHBOARD_REAL_MODEL) through the HTTP server and
the `openai` client: JSON Schema, JSON object, choice and regex requests, with and without a LoRA adapter, in one
batch; every response parses and validates."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import openai
import pytest
from peft import LoraConfig

from switchboard.serving.demo_adapters import build_adapter

from ...real_model import REAL_MODEL, needs_real_model
from .conftest import RunningServer, serve_config, start_server

MODEL = REAL_MODEL
pytestmark = needs_real_model
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "country": {"type": "string", "maxLength": 20},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 1000},  # a seeded LoRA writes 1e50
    },
    "required": ["city", "country", "population_millions"],
    "additionalProperties": False,
}
SENTIMENTS = ["positive", "negative", "neutral"]
CAT = "Give me a JSON object describing a cat with its name and age."
DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    adapter_dir = build_adapter(MODEL, lora, tmp_path_factory.mktemp("real-lora"), 11)
    config = serve_config(
        MODEL,
        adapters={"real-lora": adapter_dir},
        store=tmp_path_factory.mktemp("store"),
        max_model_len=1024,
        num_kv_blocks=512,
    )
    running = start_server(config)
    yield running
    running.stop()


def _chat(client: openai.OpenAI, model: str, content: str, **kw: Any) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=96, temperature=0, **kw
    )


def test_real_model_structured_output_with_and_without_an_adapter(real_server: RunningServer) -> None:
    base = real_server.engine.model_name
    city = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    calls = []
    for model in (base, "real-lora"):
        calls += [
            (lambda c, m=model: _chat(c, m, "Describe Paris as JSON.", response_format=city), CITY),
            (
                lambda c, m=model: _chat(c, m, CAT, response_format={"type": "json_object"}),
                {"type": "object"},
            ),
            (
                lambda c, m=model: _chat(c, m, "Sentiment of 'I love it'?", extra_body={"guided_choice": SENTIMENTS}),
                SENTIMENTS,
            ),
            (lambda c, m=model: _chat(c, m, "When did WW2 end?", extra_body={"guided_regex": DATE}), DATE),
            (lambda c, m=model: _chat(c, m, "Say hello."), None),
        ]
    with (
        openai.OpenAI(base_url=real_server.api_url, api_key="x", max_retries=0, timeout=300) as client,
        ThreadPoolExecutor(max_workers=len(calls)) as pool,
    ):
        responses = list(pool.map(lambda call: call[0](client), calls))
    for (_, expected), response in zip(calls, responses, strict=True):
        [choice] = response.choices
        text = choice.message.content or ""
        if expected is None:
            assert text
            continue
        assert choice.finish_reason == "stop", text
        if isinstance(expected, dict):
            jsonschema.validate(json.loads(text), expected)
        elif isinstance(expected, list):
            assert text in expected
        else:
            assert re.fullmatch(expected, text), text
