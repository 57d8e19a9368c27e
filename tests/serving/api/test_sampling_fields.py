"""vLLM's sampling fields through the real server and the real `openai` client (issue 19, item 1): each applied one
changes what comes back as it should, and each one this server cannot apply is refused with a 400 that says why."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
import torch

PROMPT = "def fibonacci(n):\n    "
GREEDY = {"temperature": 0.0}


def _text(client: openai.OpenAI, model: str, max_tokens: int = 16, **extra: object) -> openai.types.Completion:
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, extra_body=extra, **GREEDY)


def test_repetition_penalty_changes_greedy_output(client: openai.OpenAI, model_name: str) -> None:
    plain = _text(client, model_name, ignore_eos=True)
    penalized = _text(client, model_name, ignore_eos=True, repetition_penalty=5.0)
    assert penalized.choices[0].text != plain.choices[0].text  # exactness: tests/serving/engine


def test_presence_and_frequency_penalties_through_the_client(client: openai.OpenAI, model_name: str) -> None:
    plain = _text(client, model_name, max_tokens=64, ignore_eos=True, logprobs=0).choices[0].logprobs.tokens
    assert len(set(plain)) < len(plain)  # greedy repeats tokens: what the penalties act on

    def penalized(**fields: float) -> list[str]:
        resp = client.completions.create(
            model=model_name, prompt=PROMPT, max_tokens=64, logprobs=0, extra_body={"ignore_eos": True}, **fields
        )
        return resp.choices[0].logprobs.tokens

    assert penalized(presence_penalty=2.0, temperature=0.0) != plain
    assert penalized(frequency_penalty=2.0, temperature=0.0) != plain


def test_logit_bias_forces_a_token(client: openai.OpenAI, server, model_name: str) -> None:
    tok = server.engine.tokenizer
    token = tok.encode("Z", add_special_tokens=False)[0]
    resp = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=4, logit_bias={str(token): 100}, logprobs=0, **GREEDY
    )
    assert resp.choices[0].logprobs.tokens == [tok.decode([token])] * 4
    chat = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=3, logit_bias={str(token): 100}
    )
    assert chat.choices[0].message.content == tok.decode([token]) * 3


def test_allowed_token_ids_and_bad_words(client: openai.OpenAI, server, model_name: str) -> None:
    tok = server.engine.tokenizer
    allowed = tok.encode("ab", add_special_tokens=False)
    resp = _text(client, model_name, max_tokens=12, allowed_token_ids=allowed, logprobs=0, ignore_eos=True)
    assert set(resp.choices[0].text) <= set("ab")
    plain = _text(client, model_name, ignore_eos=True, logprobs=0).choices[0].logprobs.tokens
    word = next(t for t in plain if t.isascii() and t.isalpha() and len(tok.encode(t, add_special_tokens=False)) == 1)
    banned = _text(client, model_name, ignore_eos=True, logprobs=0, bad_words=[word]).choices[0].logprobs.tokens
    assert word in plain and word not in banned


def test_min_tokens_delays_eos(client: openai.OpenAI, server, model_name: str) -> None:
    """A logit bias makes EOS the greedy choice at once; min_tokens holds it off for 5 tokens, then it ends."""
    eos = str(server.engine.tokenizer.eos_token_id)
    at_once = _text(client, model_name, logit_bias={eos: 100})
    assert at_once.usage.completion_tokens == 1 and at_once.choices[0].finish_reason == "stop"
    delayed = _text(client, model_name, logit_bias={eos: 100}, min_tokens=5)
    assert delayed.usage.completion_tokens == 6 and delayed.choices[0].finish_reason == "stop"


def test_include_stop_str_in_output(client: openai.OpenAI, model_name: str) -> None:
    plain = _text(client, model_name, ignore_eos=True).choices[0].text
    stop = plain[4:6]
    cut = _text(client, model_name, stop=[stop], ignore_eos=True).choices[0].text
    kept = _text(client, model_name, stop=[stop], ignore_eos=True, include_stop_str_in_output=True).choices[0].text
    assert cut == plain[: plain.index(stop)] and kept == cut + stop


def test_min_p_one_is_greedy(client: openai.OpenAI, model_name: str) -> None:
    greedy = _text(client, model_name, ignore_eos=True).choices[0].text
    extra = {"min_p": 1.0, "ignore_eos": True}
    resp = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=16, temperature=1.5, seed=5, extra_body=extra
    )
    assert resp.choices[0].text == greedy


def test_skip_special_tokens_false_shows_them(client: openai.OpenAI, server, model_name: str) -> None:
    tok = server.engine.tokenizer
    eos = tok.eos_token_id
    body = {"logit_bias": {str(eos): 100}, "ignore_eos": True}
    hidden = _text(client, model_name, max_tokens=2, **body).choices[0].text
    shown = _text(client, model_name, max_tokens=2, skip_special_tokens=False, **body).choices[0].text
    assert hidden == "" and shown == tok.eos_token * 2


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_returns_prompt_logprobs(server, model_name: str, stream: bool) -> None:
    tok = server.engine.tokenizer
    ids = tok.encode(PROMPT)
    body = {"model": model_name, "prompt": PROMPT, "max_tokens": 3, "echo": True, "logprobs": 2, "temperature": 0}
    with openai.OpenAI(base_url=server.api_url, api_key="x", max_retries=0) as client:
        if stream:
            chunks = list(client.completions.create(stream=True, **body))
            text = "".join(c.choices[0].text for c in chunks)
            tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
        else:
            choice = client.completions.create(**body).choices[0]
            text, tokens = choice.text, choice.logprobs.token_logprobs
            plain = client.completions.create(**{**body, "echo": False}).choices[0]
            assert text == PROMPT + plain.text
            assert choice.logprobs.top_logprobs[0] is None and len(choice.logprobs.top_logprobs[1]) == 2
            assert choice.logprobs.text_offset[len(ids)] == len(PROMPT)
    assert text.startswith(PROMPT)
    assert tokens[0] is None and len(tokens) == len(ids) + 3
    assert all(isinstance(t, float) and math.isfinite(t) and t <= 0 for t in tokens[1:])


def test_echo_prompt_logprobs_equal_a_forward_pass(server, model_name: str, tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    ids = server.engine.tokenizer.encode(PROMPT)
    resp = httpx.post(
        f"{server.api_url}/completions",
        json={"model": model_name, "prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 0, "temperature": 0},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    got = resp.json()["choices"][0]["logprobs"]["token_logprobs"][: len(ids)]
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = hf(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    assert got[0] is None
    assert got[1:] == pytest.approx([float(want[p, ids[p + 1]]) for p in range(len(ids) - 1)], abs=1e-4)


@pytest.mark.parametrize(
    ("route", "body", "param", "says"),
    [
        ("completions", {"suffix": "x"}, "suffix", "fill-in-the-middle"),
        ("completions", {"best_of": 3}, "best_of", "best of several"),
        ("completions", {"use_beam_search": True}, "use_beam_search", "no beam search"),
        ("completions", {"spaces_between_special_tokens": False}, "spaces_between_special_tokens", "fast tokenizer"),
        ("completions", {"prompt_logprobs": 1}, "prompt_logprobs", "`echo` with `logprobs`"),
        ("completions", {"logit_bias": {"abc": 1}}, "logit_bias", "not a token id"),
        ("completions", {"logit_bias": {"99999999": 1}}, "logit_bias", "not a token id"),
        ("completions", {"logit_bias": {"5": "high"}}, "logit_bias", "must be a number"),
        ("completions", {"allowed_token_ids": [99999999]}, "allowed_token_ids", "outside the vocabulary"),
        ("completions", {"allowed_token_ids": []}, "allowed_token_ids", ""),
        ("completions", {"min_tokens": 20, "max_tokens": 5}, "min_tokens", "max_tokens"),
        ("completions", {"repetition_penalty": 0}, "repetition_penalty", ""),
        ("completions", {"presence_penalty": 3}, "presence_penalty", ""),
        ("completions", {"bad_words": ["x"] * 1025}, "bad_words", ""),
        ("completions", {"stop": ["x"] * 1025}, "stop", "at most 1024"),
        ("chat", {"stop_token_ids": [1] * 1025}, "stop_token_ids", "at most 1024"),
        ("chat", {"echo": True}, "echo", "/v1/completions"),
        ("chat", {"priority": 1}, "priority", "no priorities"),
    ],
)
def test_fields_that_cannot_apply_are_refused_saying_why(
    http: httpx.Client, model_name: str, route: str, body: dict, param: str, says: str
) -> None:
    if route == "completions":
        url, base = "/v1/completions", {"prompt": "x"}
    else:
        url, base = "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}
    resp = http.post(url, json={"model": model_name, **base, **body})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, json.dumps(error)
    assert says in error["message"]
