"""Adapters of every kind through our engine: PEFT parity, mixed batches, merged mode, refusals (fp32)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from switchboard.adapters_store.kinds.base import AdapterError, AdapterKind
from switchboard.kernels.cpu_adapters import coded_slots_pay, compiled_adapters_available
from switchboard.serving.config import ServeConfig
from switchboard.serving.engine.llm_engine import LLMEngine
from switchboard.serving.engine.request import SamplingParams
from switchboard.training.greedy import greedy_tokens

KINDS = ["lora", "lora-rslora", "lokr-full", "lokr-decomposed", "ia3", "prefix"]
PROMPT = [0, 45, 300, 12, 77, 401, 9, 230, 18, 64, 99, 150]
GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


def _engine(model_dir: Path, adapters: dict[str, Path], **kw) -> LLMEngine:
    return LLMEngine(ServeConfig(model=model_dir, dtype="float32", num_kv_blocks=256, adapters=adapters, **kw))


def _peft(model_dir: Path, adapter_dir: Path) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, peft_adapters: dict[str, Path]) -> LLMEngine:
    return _engine(tiny_model_dir, peft_adapters)


@pytest.mark.parametrize("name", KINDS)
def test_logits_and_greedy_tokens_match_peft(
    name: str, engine: LLMEngine, tiny_model_dir: Path, peft_adapters: dict[str, Path]
) -> None:
    peft = _peft(tiny_model_dir, peft_adapters[name])
    with torch.inference_mode():
        ref = peft(input_ids=torch.tensor([PROMPT])).logits[0]
        with peft.disable_adapter():
            base = peft(input_ids=torch.tensor([PROMPT])).logits[0]
    ref_tokens = greedy_tokens(peft, PROMPT, GREEDY.max_tokens)
    ours = engine.prompt_logits(PROMPT, name).cpu()  # the engine's device: CUDA where there is one
    assert (ours - ref).abs().max().item() <= 1e-4
    assert (ref - base).abs().max().item() > 1e-2  # the adapter really changes the output
    assert engine.generate([PROMPT], GREEDY, [name])[0] == ref_tokens


def test_mixed_batch_of_every_kind_equals_each_request_alone(
    tiny_model_dir: Path, peft_adapters: dict[str, Path]
) -> None:
    names: list[str | None] = [*peft_adapters, None]  # 8 adapters of four kinds, and the base model
    g = torch.Generator().manual_seed(3)
    prompts, adapter_ids = [], []
    for i in range(16):
        prompts.append(
            [0, *torch.randint(10, 500, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist()]
        )
        adapter_ids.append(names[i % len(names)])
    alone_engine = _engine(tiny_model_dir, peft_adapters)
    alone = [alone_engine.generate([p], GREEDY, [a])[0] for p, a in zip(prompts, adapter_ids, strict=True)]
    # All 16 together, with chunked prefill mixed into decodes and one device slot per kind (slots are reused).
    mixed_engine = _engine(tiny_model_dir, peft_adapters, max_batch_tokens=40, max_resident_adapters=1)
    assert mixed_engine.generate(prompts, GREEDY, adapter_ids) == alone
    assert mixed_engine.served_adapters.stats().evictions > 0
    together = _engine(tiny_model_dir, peft_adapters)
    assert together.generate(prompts, GREEDY, adapter_ids) == alone
    assert len({tuple(t) for t in alone}) > 8  # adapters give different continuations


def test_a_steps_adapter_batch_is_reused_only_while_the_batch_is_the_same(
    engine: LLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = engine.served_adapters.steps
    built = []
    build = steps._build
    monkeypatch.setattr(steps, "_build", lambda scheduled: built.append(1) or build(scheduled))
    batches = []
    run = steps.batch
    monkeypatch.setattr(steps, "batch", lambda scheduled: batches.append(run(scheduled)) or batches[-1])
    # Two requests whose prompts take one prefill step, then 5 decode steps of the same two tokens; the shorter one
    # ends after 2 decode steps, which changes the batch.
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (6, 3)]
    for i, (p, name) in enumerate(zip(params, ["lora", "ia3"], strict=True)):
        engine.add_request(f"reuse-{i}", PROMPT, p, name)
    while engine.has_unfinished():
        engine.step()
    prefill, *decodes = batches
    assert prefill is not None and all(b is not None for b in decodes)
    assert len({id(b) for b in decodes}) == 2  # both requests, then the longer one alone
    assert len(built) == 3 and prefill is not decodes[0]
    assert decodes[0] is decodes[1] and decodes[-1] is not decodes[0]


@pytest.mark.parametrize("name", ["lora", "lokr-full", "lokr-decomposed", "ia3"])
def test_merged_equals_unmerged(name: str, engine: LLMEngine, tiny_model_dir: Path, peft_adapters) -> None:
    merged = _engine(tiny_model_dir, {name: peft_adapters[name]}, merge_adapter=name)
    unmerged = engine.prompt_logits(PROMPT, name)
    assert (merged.prompt_logits(PROMPT, name) - unmerged).abs().max().item() <= 1e-4


def test_prefix_cannot_be_merged(tiny_model_dir: Path, peft_adapters: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="prefix adapter cannot be merged"):
        _engine(tiny_model_dir, {"p": peft_adapters["prefix"]}, merge_adapter="p")


def _broken(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    if how == "peft_type":
        config["peft_type"] = "VERA"
    elif how == "bin":
        (dst / "adapter_model.safetensors").unlink()
        (dst / "adapter_model.bin").write_bytes(b"\x80\x04not unpickled")
    elif how == "unknown-module":
        config["r"] = 8
    (dst / "adapter_config.json").write_text(json.dumps(config))
    if how in ("shape", "nan", "unknown-module"):
        from safetensors.torch import load_file, save_file

        tensors = load_file(dst / "adapter_model.safetensors")
        key = next(k for k in tensors if "q_proj.lora_A" in k)
        if how == "shape":
            tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
        elif how == "nan":
            tensors[key][0, 0] = float("nan")
        else:
            tensors[key.replace("q_proj", "qq_proj")] = tensors.pop(key)
        save_file(tensors, dst / "adapter_model.safetensors")
    return dst


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("peft_type", "VERA"),
        ("bin", "pickle"),
        ("shape", "shape"),
        ("nan", "NaN"),
        ("unknown-module", "qq_proj"),
    ],
)
def test_malformed_adapters_are_refused_at_start_up(
    how: str, message: str, tiny_model_dir: Path, peft_adapters: dict[str, Path], tmp_path: Path
) -> None:
    bad = _broken(peft_adapters["lora"], tmp_path / "bad", how)
    with pytest.raises(AdapterError) as err:
        _engine(tiny_model_dir, {"bad": bad})
    text = str(err.value)
    assert message.lower() in text.lower()
    assert "adapter_config.json" in text or "adapter_model" in text  # names the file


def test_prefix_with_a_one_token_prompt(engine: LLMEngine, tiny_model_dir: Path, peft_adapters) -> None:
    # A 1-token prompt is scheduled as a decode token: its prefix must still be written first.
    ref = greedy_tokens(_peft(tiny_model_dir, peft_adapters["prefix"]), [0], 16)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    assert engine.generate([[0]], params, ["prefix"])[0] == ref


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "bfloat16"])
def test_bf16_mixed_batch_runs_with_every_kind(tiny_model_dir: Path, peft_adapters, kv_cache_dtype: str) -> None:
    # bf16 weights and adapter slots over a float32 (CPU default) or bf16 KV cache: dtypes must meet everywhere.
    engine = LLMEngine(
        ServeConfig(
            model=tiny_model_dir,
            dtype="bfloat16",
            num_kv_blocks=128,
            adapters=peft_adapters,
            kv_cache_dtype=kv_cache_dtype,
        )
    )
    names = [*peft_adapters, None]
    out = engine.generate(
        [[0, 5, 9, 100]] * len(names), SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), names
    )
    assert [len(o) for o in out] == [6] * len(names)


def test_coded_lora_slots_give_the_same_tokens(tiny_model_dir: Path, peft_adapters) -> None:
    # bf16 LoRA slots coded for the CPU op (`--no-code-lora-slots` turns it off): exact, so decoding is unchanged.
    names = ["lora", "lora-rslora", None, "lora", "ia3"]
    prompts = [[0, 5, 9, 100], [0, 7], [0, 300, 12], [0, 45, 46, 47, 48], [0, 11]]
    tokens = {}
    for code in (True, False):
        config = ServeConfig(
            model=tiny_model_dir,
            dtype="bfloat16",
            device="cpu",  # the compiled op and its coded slots are the CPU's
            num_kv_blocks=128,
            adapters=peft_adapters,
            code_lora_slots=code,
        )
        engine = LLMEngine(config)
        packed = [
            p.compiled
            for p in engine.served_adapters.layouts[AdapterKind.LORA].packed.values()
            if p.compiled is not None
        ]
        coded = code and compiled_adapters_available() and coded_slots_pay()
        assert packed or not compiled_adapters_available()
        assert all(bool(c.coded) == coded for c in packed)
        tokens[code] = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), names)
    assert tokens[True] == tokens[False]


@pytest.mark.parametrize("length", [100, 200])  # below and above the compiled backend's MIN_GEMM_RUN (128)
@pytest.mark.parametrize("name", ["lora", "lokr-full", "ia3"])
def test_a_long_prompts_logits_match_peft(
    name: str, length: int, engine: LLMEngine, tiny_model_dir: Path, peft_adapters: dict[str, Path]
) -> None:
    """A prefill run of one adapter goes to the gathered ops or to matmuls by its length; both match PEFT."""
    prompt = torch.randint(0, 300, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    peft = _peft(tiny_model_dir, peft_adapters[name])
    with torch.inference_mode():
        ref = peft(input_ids=torch.tensor([prompt])).logits[0]
    assert (engine.prompt_logits(prompt, name).cpu() - ref).abs().max().item() <= 1e-4
