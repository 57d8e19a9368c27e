"""The real default model (SmolLM2-135M-Instruct, fetched from its registry package by `make test` into
.cache/models/, passed as $SWITCHBOARD_REAL_MODEL) through the same loader as any checkpoint: its chat answer is
English, and our engine's greedy tokens equal transformers' (plain forward passes, float32)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from switchboard.serving.api.prompts import Budget, chat_prompt
from switchboard.serving.api.schemas import ChatMessage
from switchboard.serving.config import ServeConfig
from switchboard.serving.engine.llm_engine import LLMEngine, load_tokenizer
from switchboard.serving.engine.request import SamplingParams
from switchboard.serving.models.config import ModelConfig
from switchboard.training.greedy import greedy_tokens

from ...real_model import REAL_MODEL, needs_real_model

MODEL = REAL_MODEL
pytestmark = needs_real_model
QUESTION = "What is the capital of France?"


def test_the_real_model_answers_in_english_as_transformers_does() -> None:
    tokenizer = load_tokenizer(MODEL)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    prompt = tokenizer(text, add_special_tokens=False).input_ids
    engine = LLMEngine(ServeConfig(model=MODEL, dtype="float32", device="cpu", num_kv_blocks=64))
    ours = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0))[0]
    assert tokenizer.decode(ours, skip_special_tokens=True).strip() == "The capital of France is Paris."
    reference = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    assert ours == greedy_tokens(reference, prompt, 12)[: len(ours)]
    assert ours[-1] in engine.eos_token_ids  # it stops at the chat turn's end


def test_the_gguf_derived_tokenizer_adds_no_bos_and_its_chat_prompt_has_one() -> None:
    """The tokenizer transformers writes from the GGUF (class TokenizersBackend, BOS <|im_start|>, EOS <|im_end|>):
    plain prompts get no BOS, a chat prompt starts with exactly one <|im_start|> (the template writes it), the
    turn's end is an EOS of the engine, and replies decode without the special tokens."""
    tokenizer = load_tokenizer(MODEL)
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert tokenizer("The capital of France is").input_ids[0] != start
    messages = [ChatMessage(role="user", content=QUESTION)]
    ids = chat_prompt(messages, tokenizer, Budget(16, 2048, "messages"))
    assert ids[0] == start and ids[1] != start and ids.count(start) == 3  # system, user, assistant
    assert end in ModelConfig.from_dir(MODEL).eos_token_ids
    assert tokenizer.decode([*tokenizer("Paris.").input_ids, end], skip_special_tokens=True) == "Paris."
