"""The same LoRA adapter through both backends gives the same greedy tokens in float32, and both are the tokens of
plain forward passes through PEFT's model (training/greedy.py): real servers, the real `openai` client.

Tokens are compared by the names logprobs give them (`TokenTexts`: a token's text, or its exact bytes where it holds
part of a character), which differ for different token ids, so equal names mean equal ids.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from switchboard.serving.api.responses import TokenTexts
from switchboard.training.greedy import greedy_tokens

from ..serve_process import ServeProcess

pytest.importorskip("vllm", reason="the vLLM backend's tests run in `make test-vllm` (vLLM's own venv)")

PROMPTS = ["def fibonacci(n):", "The quick brown fox", "SELECT name FROM users WHERE"]
NEW_TOKENS = 24


def reference(model_dir: Path, adapter: Path | None, prompt: list[int]) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    return greedy_tokens(model, prompt, NEW_TOKENS)


def served_tokens(server: ServeProcess, model: str, prompt: list[int]) -> tuple[list[str], list[float]]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120) as client:
        out = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=NEW_TOKENS,
            temperature=0,
            logprobs=0,
            extra_body={"ignore_eos": True},
        )
    logprobs = out.choices[0].logprobs
    assert out.usage.completion_tokens == NEW_TOKENS
    return list(logprobs.tokens), list(logprobs.token_logprobs)


@pytest.mark.parametrize("adapter", ["lora", None], ids=["lora", "base"])
def test_both_backends_give_the_reference_greedy_tokens(
    adapter: str | None,
    vllm_model_dir: Path,
    vllm_adapters: dict[str, Path],
    vllm_server: ServeProcess,
    native_server: ServeProcess,
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(vllm_model_dir)
    names = TokenTexts(tokenizer)
    model = adapter or vllm_model_dir.name
    for text in PROMPTS:
        prompt = tokenizer(text)["input_ids"]
        expected = [names.text(t) for t in reference(vllm_model_dir, vllm_adapters.get(adapter or ""), prompt)]
        native, native_lp = served_tokens(native_server, model, prompt)
        vllm, vllm_lp = served_tokens(vllm_server, model, prompt)
        assert native == expected, f"native engine, prompt {text!r}"
        assert vllm == expected, f"vLLM backend, prompt {text!r}"
        assert vllm_lp == pytest.approx(native_lp, abs=1e-3)


def test_an_uploaded_lora_matches_the_start_up_one(
    vllm_model_dir: Path, vllm_adapters: dict[str, Path], vllm_server: ServeProcess, native_server: ServeProcess
) -> None:
    """The same files uploaded into each server's store: served from the store version's directory (vLLM's
    LoRARequest) they give what the start-up adapter gives, on both backends."""
    files = {
        name: (name, (vllm_adapters["lora"] / name).read_bytes())
        for name in ("adapter_config.json", "adapter_model.safetensors")
    }
    tokenizer = AutoTokenizer.from_pretrained(vllm_model_dir)
    prompt = tokenizer(PROMPTS[0])["input_ids"]
    for server in (native_server, vllm_server):
        r = httpx.post(f"{server.url}/v1/adapters", data={"adapter_id": "parity-upload"}, files=files, timeout=60)
        assert r.status_code == 201, r.text
        assert served_tokens(server, "parity-upload", prompt)[0] == served_tokens(server, "lora", prompt)[0]
