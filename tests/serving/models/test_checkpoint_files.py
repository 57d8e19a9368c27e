"""What real checkpoints put in their files, each on a copy of the tiny model (the real model's own test is
test_real_model.py): transformers-5 configs (`rope_parameters` with theta inside), end-of-sequence lists in
generation_config.json, and chat templates in chat_template.jinja rather than tokenizer_config.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from switchboard.serving.api.prompts import Budget, chat_prompt
from switchboard.serving.api.schemas import ChatMessage
from switchboard.serving.config import ServeConfig
from switchboard.serving.engine.llm_engine import LLMEngine, load_tokenizer
from switchboard.serving.engine.request import SamplingParams
from switchboard.serving.models.config import ModelConfig

LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def _edit_json(path: Path, **changes: object) -> dict:
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))
    return raw


def test_rope_parameters_read_as_the_older_rope_theta_and_rope_scaling(model_copy: Path) -> None:
    raw = json.loads((model_copy / "config.json").read_text())
    raw.pop("rope_theta", None)
    new = {**raw, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3_SCALING}}
    old = {**raw, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **LLAMA3_SCALING}}
    old.pop("rope_parameters", None)
    assert ModelConfig.from_dict(new) == ModelConfig.from_dict(old)
    cfg = ModelConfig.from_dict(new)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == {"rope_type": "llama3", **LLAMA3_SCALING}
    (model_copy / "config.json").write_text(json.dumps(new))
    LLMEngine(ServeConfig(model=model_copy, dtype="float32", device="cpu", num_kv_blocks=8))  # loads and serves


def test_generation_config_eos_lists_end_a_sequence_at_any_of_them(model_copy: Path) -> None:
    """Instruct checkpoints list every end-of-turn token in generation_config.json (Llama 3: three of them) while
    config.json names one: a sequence stops at each."""
    engine = LLMEngine(ServeConfig(model=model_copy, dtype="float32", device="cpu", num_kv_blocks=16))
    prompt = [5, 6, 7, 8]
    free = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    # a token first generated third or later, so that the stop is seen mid-sequence
    stop_at = next(i for i in range(2, len(free)) if free[i] not in engine.eos_token_ids and free[i] not in free[:i])
    config_eos = json.loads((model_copy / "config.json").read_text())["eos_token_id"]
    _edit_json(model_copy / "generation_config.json", eos_token_id=[config_eos, free[stop_at]])

    assert free[stop_at] in ModelConfig.from_dir(model_copy).eos_token_ids
    engine = LLMEngine(ServeConfig(model=model_copy, dtype="float32", device="cpu", num_kv_blocks=16))
    assert {config_eos, free[stop_at]} <= engine.eos_token_ids
    assert engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0))[0] == free[: stop_at + 1]


def test_a_chat_template_in_chat_template_jinja_renders_chat_prompts(model_copy: Path) -> None:
    """transformers 5 saves the template as chat_template.jinja beside tokenizer_config.json (the fetched real model
    has it so); the server renders chat requests with it."""
    _edit_json(model_copy / "tokenizer_config.json", chat_template=None)
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}[assistant]"
    (model_copy / "chat_template.jinja").write_text(template)
    tokenizer = load_tokenizer(model_copy)
    assert tokenizer.chat_template == template
    ids = chat_prompt([ChatMessage(role="user", content="hi")], tokenizer, Budget(8, 256, "messages"))
    assert ids == tokenizer("[user]hi\n[assistant]").input_ids
