"""The embedded demo model: loads with transformers, is reproducible, and decodes greedily without near-ties."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from switchboard.serving.demo import DemoSpec, build_demo_model, ensure_demo_model, tiny_spec

GREEDY_PROMPTS = ["def main():\n", "The quick brown fox", "héllo wörld ✓"]
GREEDY_TOKENS = 32


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("demo") / "tiny", tiny_spec())


def test_tiny_model_loads_with_transformers(tiny_dir: Path) -> None:
    spec = tiny_spec()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (64, 2, 2)
    assert config.vocab_size == len(tokenizer) == spec.vocab_size
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<s>", "</s>", "<pad>"]
    weights = load_file(tiny_dir / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert torch.equal(weights["model.norm.weight"], torch.ones(64))
    assert weights["model.embed_tokens.weight"].std().item() == pytest.approx(spec.init_std, rel=0.05)


def test_same_seed_builds_identical_files(tmp_path: Path) -> None:
    first = build_demo_model(tmp_path / "a", tiny_spec())
    second = build_demo_model(tmp_path / "b", tiny_spec())
    other_seed = build_demo_model(tmp_path / "c", tiny_spec(seed=1))
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (other_seed / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no staging directories left behind


def test_ensure_rebuilds_only_an_unfinished_build(tmp_path: Path) -> None:
    out = build_demo_model(tmp_path / "model", tiny_spec())
    weights = (out / "model.safetensors").read_bytes()
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    ensure_demo_model(out, tiny_spec())
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # finished: left alone

    (out / "config.json").unlink()  # what an interrupted build looks like
    (out / "model.safetensors").write_bytes(b"truncated")
    ensure_demo_model(out, tiny_spec())
    assert (out / "config.json").is_file()
    assert (out / "model.safetensors").read_bytes() == weights


def test_tokenizer_round_trips_non_ascii(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    for text in ("héllo wörld ✓", "def f(x):\n\treturn x  # 日本語\n"):
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert tokenizer.decode(ids[1:]) == text


def test_chat_template_renders_with_one_bos(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|system|>\nBe brief.</s>\n<|user|>\nhéllo?</s>\n<|assistant|>\n"
    ids = tokenizer(text).input_ids  # the server encodes the rendered text with special tokens
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    roles = tokenizer.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>"])
    assert [i for i in ids if i in roles] == roles  # each role tag is one token
    assert ids.count(tokenizer.eos_token_id) == 2


def test_greedy_decoding_is_well_separated(tiny_dir: Path) -> None:
    """Greedy decoding has no near-ties, so tests may compare greedy tokens across implementations in fp32.

    The threshold is 50x the largest logit difference between cached decoding and a full forward pass (~2e-5 for
    this model in fp32: the size of the disagreement between two correct fp32 implementations), and at least 1e-3.
    The min gap measured for these prompts is ~0.01, so the test also fails if a change makes decoding loop.
    """
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    for prompt in GREEDY_PROMPTS:
        prompt_ids = tokenizer(prompt).input_ids
        cache = DynamicCache(config=model.config)
        step_input = torch.tensor([prompt_ids])  # [1, S]
        generated: list[int] = []
        step_logits: list[torch.Tensor] = []
        with torch.no_grad():
            for _ in range(GREEDY_TOKENS):
                logits = model(step_input, past_key_values=cache, use_cache=True).logits[0, -1]  # [V]
                step_logits.append(logits)
                generated.append(int(logits.argmax()))
                step_input = torch.tensor([[generated[-1]]])
            full = model(torch.tensor([prompt_ids + generated])).logits[0, len(prompt_ids) - 1 : -1]  # [T, V]
        decoded = torch.stack(step_logits)  # [T, V]
        top2 = decoded.topk(2, dim=-1).values
        min_gap = (top2[:, 0] - top2[:, 1]).min().item()
        path_noise = (full - decoded).abs().max().item()
        assert min_gap > max(1e-3, 50 * path_noise), (prompt, min_gap, path_noise)
        assert len(set(generated)) >= GREEDY_TOKENS // 2, (prompt, generated)  # not stuck repeating a token


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="heads"):
        DemoSpec(hidden_size=100, num_heads=8)
    with pytest.raises(ValueError, match="num_kv_heads"):
        DemoSpec(num_heads=8, num_kv_heads=3)
    with pytest.raises(ValueError, match="dtype"):
        tiny_spec(dtype="int8")
    assert tiny_spec(num_layers=3).num_layers == 3
