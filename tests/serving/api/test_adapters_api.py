"""Adapters through the HTTP API with the real openai client: adapter_id, model=<adapter>, /v1/models, 404s."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from .conftest import RunningServer, ServerFactory

SERVED = ["lora", "lokr-full", "ia3", "prefix"]


@pytest.fixture(scope="module")
def adapter_server(server_factory: ServerFactory, peft_adapters: dict[str, Path]) -> RunningServer:
    return server_factory(adapters={name: peft_adapters[name] for name in SERVED})


@pytest.fixture(scope="module")
def client(adapter_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=adapter_server.api_url, api_key="unused", max_retries=0)


def _complete(client: openai.OpenAI, model: str, **extra) -> openai.types.Completion:
    return client.completions.create(
        model=model, prompt="def main():", max_tokens=8, temperature=0, extra_body={"ignore_eos": True, **extra}
    )


def test_models_lists_adapters_with_parent_and_kind(client: openai.OpenAI, adapter_server: RunningServer) -> None:
    cards = {m.id: m.model_dump() for m in client.models.list().data}
    base = adapter_server.engine.model_name
    assert set(cards) == {base, *SERVED}
    assert {cards[n]["kind"] for n in SERVED} == {"lora", "krona", "ia3", "prefix"}
    assert all(cards[n]["parent"] == base for n in SERVED)


@pytest.mark.parametrize("name", SERVED)
def test_adapter_id_and_model_name_select_the_same_adapter(
    name: str, client: openai.OpenAI, adapter_server: RunningServer
) -> None:
    base = adapter_server.engine.model_name
    by_id = _complete(client, base, adapter_id=name)
    by_model = _complete(client, name)
    plain = _complete(client, base)
    assert by_id.model == by_model.model == name
    assert by_id.choices[0].text == by_model.choices[0].text
    assert by_id.choices[0].text != plain.choices[0].text  # the adapter acts


def test_chat_and_streaming_with_an_adapter(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model="lora", messages=messages, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(model="lora", messages=messages, max_tokens=10, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == whole.choices[0].message.content and whole.model == "lora"


def test_unknown_adapter_is_404_adapter_not_found(client: openai.OpenAI, adapter_server: RunningServer) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        _complete(client, adapter_server.engine.model_name, adapter_id="no-such-adapter")
    assert err.value.body["code"] == "adapter_not_found" and err.value.body["param"] == "adapter_id"
    with pytest.raises(openai.NotFoundError) as err:
        _complete(client, "no-such-adapter")
    assert err.value.body["code"] == "model_not_found"


def test_merged_server_serves_only_its_adapter(server_factory: ServerFactory, peft_adapters: dict[str, Path]) -> None:
    running = server_factory(adapters={"lora": peft_adapters["lora"]}, merge_adapter="lora")
    client = openai.OpenAI(base_url=running.api_url, api_key="unused", max_retries=0)
    assert _complete(client, "lora").model == "lora"
    with pytest.raises(openai.NotFoundError, match="merged"):
        _complete(client, running.engine.model_name)


def test_prompt_leaving_no_room_for_the_prefix_is_a_400(client: openai.OpenAI, adapter_server: RunningServer) -> None:
    # The prefix adapter's 8 virtual tokens count against the context window; the engine's refusal is a 400.
    tokens = adapter_server.engine.max_model_len - 4
    with pytest.raises(openai.BadRequestError, match="context window"):
        client.completions.create(model="prefix", prompt=[5] * tokens, max_tokens=1)
