"""Completions and chat completions through the real `openai` client against a real server (tiny model)."""

from __future__ import annotations

import openai
import pytest

PROMPT = "def fibonacci(n):\n    "
GREEDY = {"temperature": 0.0}
NO_EOS = {"ignore_eos": True}  # the random tiny model may emit EOS at any point; tests that need length pin it


def test_completion_shape_and_usage(client: openai.OpenAI, server, model_name: str) -> None:
    resp = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=8, **GREEDY)
    assert resp.id.startswith("cmpl-") and len(resp.id) > len("cmpl-") + 16
    assert resp.object == "text_completion"
    assert resp.model == model_name
    assert isinstance(resp.created, int)
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.index == 0 and isinstance(choice.text, str)
    assert choice.finish_reason in ("stop", "length")
    assert choice.logprobs is None
    assert resp.usage.prompt_tokens == len(server.engine.tokenizer.encode(PROMPT))
    assert 1 <= resp.usage.completion_tokens <= 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_completion_runs_to_max_tokens(client: openai.OpenAI, model_name: str) -> None:
    resp = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=12, extra_body=NO_EOS, **GREEDY)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 12


def test_prompt_forms(client: openai.OpenAI, server, model_name: str) -> None:
    tok = server.engine.tokenizer
    ids = tok.encode(PROMPT)
    as_text = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=6, **GREEDY)
    as_ids = client.completions.create(model=model_name, prompt=ids, max_tokens=6, **GREEDY)
    assert as_ids.choices[0].text == as_text.choices[0].text
    assert as_ids.usage.prompt_tokens == len(ids)

    several = client.completions.create(model=model_name, prompt=[PROMPT, "import os\n"], max_tokens=6, n=2, **GREEDY)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == several.choices[1].text == as_text.choices[0].text
    assert several.usage.prompt_tokens == len(ids) + len(tok.encode("import os\n"))

    several_ids = client.completions.create(model=model_name, prompt=[ids, ids[:3]], max_tokens=4, **GREEDY)
    assert len(several_ids.choices) == 2
    assert several_ids.usage.prompt_tokens == len(ids) + 3


def test_chat_completion(client: openai.OpenAI, server, model_name: str) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
    resp = client.chat.completions.create(model=model_name, messages=messages, max_tokens=8, **GREEDY)
    assert resp.id.startswith("chatcmpl-")
    assert resp.object == "chat.completion"
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    tok = server.engine.tokenizer
    expected = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    assert expected.count(tok.bos_token_id) == 1 and expected[0] == tok.bos_token_id
    assert resp.usage.prompt_tokens == len(expected)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_chat_default_max_tokens_is_rest_of_context(client: openai.OpenAI, server, model_name: str) -> None:
    tok = server.engine.tokenizer
    limit = server.engine.max_model_len

    def prompt_len(words: int) -> int:
        messages = [{"role": "user", "content": "hi " * words}]
        return len(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)))

    low, high = 0, limit  # the most words whose prompt leaves at least 8 tokens of the context for the answer
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if prompt_len(mid) <= limit - 8 else (low, mid - 1)
    words = low
    assert prompt_len(words) > limit - 40
    messages = [{"role": "user", "content": "hi " * words}]
    resp = client.chat.completions.create(model=model_name, messages=messages, extra_body=NO_EOS, **GREEDY)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.total_tokens == server.engine.max_model_len


def test_completion_stream_joins_to_non_streamed_text(client: openai.OpenAI, model_name: str) -> None:
    kwargs = {"model": model_name, "prompt": PROMPT, "max_tokens": 24, "extra_body": NO_EOS, **GREEDY}
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text_chunks = [c for c in chunks if c.choices]
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_chat_stream_joins_to_non_streamed_text(client: openai.OpenAI, model_name: str) -> None:
    kwargs = {
        "model": model_name,
        "messages": [{"role": "user", "content": "Write a loop."}],
        "max_tokens": 20,
        "extra_body": NO_EOS,
        **GREEDY,
    }
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_n_choices(client: openai.OpenAI, model_name: str) -> None:
    resp = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=6, n=3, temperature=1.0, seed=7, extra_body=NO_EOS
    )
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert resp.usage.completion_tokens == 18  # summed over the choices; the prompt is counted once
    assert (
        resp.usage.prompt_tokens
        == client.completions.create(model=model_name, prompt=PROMPT, max_tokens=1).usage.prompt_tokens
    )
    chat = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        n=2,
        temperature=1.0,
        seed=3,
        extra_body=NO_EOS,
    )
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.usage.completion_tokens == 10

    chunks = list(
        client.completions.create(model=model_name, prompt=PROMPT, max_tokens=5, n=2, stream=True, extra_body=NO_EOS)
    )
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length"}


def test_stop_string(client: openai.OpenAI, model_name: str) -> None:
    kwargs = {"model": model_name, "prompt": PROMPT, "max_tokens": 32, "extra_body": NO_EOS, **GREEDY}
    full = client.completions.create(**kwargs).choices[0].text
    # A stop string whose first occurrence lies inside the text: the answer must end right before it.
    stop = next(s for k in range(2, len(full) - 2) if (s := full[k : k + 2]).strip() and full.find(s) >= 1)
    cut = full[: full.find(stop)]
    resp = client.completions.create(stop=[stop, "\x00never"], **kwargs)
    assert resp.choices[0].text == cut
    assert resp.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(stop=stop, stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_seed_reproducible(client: openai.OpenAI, model_name: str) -> None:
    kwargs = {"model": model_name, "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "extra_body": NO_EOS}
    first = client.completions.create(seed=1234, **kwargs).choices[0].text
    again = client.completions.create(seed=1234, **kwargs).choices[0].text
    other = client.completions.create(seed=4321, **kwargs).choices[0].text
    assert first == again
    assert first != other


def test_completion_logprobs(client: openai.OpenAI, model_name: str) -> None:
    resp = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=6, logprobs=3, extra_body=NO_EOS, **GREEDY
    )
    lp = resp.choices[0].logprobs
    assert lp is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert all(x <= 0.0 for x in lp.token_logprobs)
    assert all(len(top) == 3 for top in lp.top_logprobs)  # partial UTF-8 tokens are named "bytes:\\x..": no clash
    # Greedy: the chosen token is the most likely one.
    assert all(abs(max(top.values()) - x) < 1e-4 for top, x in zip(lp.top_logprobs, lp.token_logprobs, strict=False))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    if not any(token.startswith("bytes:") for token in lp.tokens):
        assert "".join(lp.tokens) == resp.choices[0].text
        assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]


def test_chat_logprobs(client: openai.OpenAI, model_name: str) -> None:
    resp = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        extra_body=NO_EOS,
        **GREEDY,
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0.0 and isinstance(entry.bytes, list)
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    assert bytes(b for e in content for b in e.bytes).decode("utf-8", "replace") == resp.choices[0].message.content
    plain = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=2, **GREEDY
    )
    assert plain.choices[0].logprobs is None


def test_models_and_health(client: openai.OpenAI, http, model_name: str, server) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]
    body = http.get("/v1/models").json()
    assert body["object"] == "list"
    card = body["data"][0]
    assert card["object"] == "model" and card["owned_by"] == "switchboard"
    assert card["max_model_len"] == server.engine.max_model_len
    assert http.get("/health").json() == {"status": "ok"}


def test_model_absent_means_base_model(http, model_name: str) -> None:
    resp = http.post("/v1/completions", json={"prompt": "x = ", "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == model_name


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_raw_stream_is_sse(http, model_name: str, route: str) -> None:
    body = {"model": model_name, "max_tokens": 3, "stream": True, "ignore_eos": True}
    body |= {"prompt": "x"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    with http.stream("POST", route, json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])


def test_several_prompts_streamed(client: openai.OpenAI, model_name: str) -> None:
    kwargs = {
        "model": model_name,
        "prompt": [PROMPT, "import os\n"],
        "max_tokens": 6,
        "n": 2,
        "extra_body": NO_EOS,
        **GREEDY,
    }
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    texts = {i: "" for i in range(4)}
    finished = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
        if choice.finish_reason is not None:
            finished[choice.index] = choice.finish_reason
    assert finished == {i: "length" for i in range(4)}
    assert texts == {c.index: c.text for c in full.choices}
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_chat_content_parts(client: openai.OpenAI, model_name: str) -> None:
    as_parts = client.chat.completions.create(
        model=model_name,
        max_tokens=4,
        **GREEDY,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi."}]}],
    )
    as_text = client.chat.completions.create(
        model=model_name, max_tokens=4, **GREEDY, messages=[{"role": "user", "content": "Say hi."}]
    )
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens
