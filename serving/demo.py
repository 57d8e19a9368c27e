"""The embedded demo model: a small seeded Llama checkpoint with a byte-level BPE tokenizer, in Hugging Face format.

Nothing is downloaded: the tokenizer is trained on this interpreter's own standard-library sources and the weights
are drawn from a seeded generator, so the same spec on the same Python gives byte-identical files.
"""

from __future__ import annotations

import errno
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .config import TORCH_DTYPES, DType

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, *ROLE_TOKENS)  # ids 0..5, in this order
# The tokenizer's post-processor prepends BOS, so the template must not: encode the rendered text with
# add_special_tokens=True (apply_chat_template(tokenize=True) encodes without special tokens and so gets no BOS).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_BYTE_ALPHABET = 256
_MAX_CORPUS_FILES = 192  # the whole top-level stdlib (~170 files, ~4.7 MB): about 1 s of BPE training
_TOKENIZERS: dict[int, str] = {}  # vocab_size -> trained tokenizer as JSON, so repeated builds train once


@dataclass(slots=True)
class DemoSpec:
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 8
    vocab_size: int = 8192
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    # Greedy decoding of the default size, 10 prompts x 64 tokens, seeds 0-2, fp32 on the bf16-saved weights:
    #   std   top1-top2 gap median / p5 / min    distinct tokens of 64   bf16 argmax flips (teacher-forced)
    #   0.02  0.06 / 0.004 / 2e-4                3-11 (loops)            3-4%
    #   0.04  0.17 / 0.015 / 3e-4                26-56                   3-4%
    #   0.05  0.21 / 0.018 / 1e-4..1e-3          57-64                   3-5%
    #   0.08  0.32 / 0.025 / 1e-4                62-64                   8-10%
    #   1.0   4.3  / 0.28  / 6e-3                62-64                   15%  (5 prompts, seed 0)
    # The logits are N(0, std^2 * hidden) across the vocabulary whatever std is, so the gap relative to their scale
    # (min ~1e-3 of it over a few hundred tokens) cannot be raised by std; a larger std only inflates the absolute
    # gap while bf16 and fp32 rounding errors grow faster. 0.05 is the smallest std tried that does not loop; the
    # fp32 difference between cached decoding and a full forward is 2e-5, far below the median gap.
    init_std: float = 0.05
    seed: int = 0
    dtype: DType = "bfloat16"  # dtype of the saved safetensors

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"hidden_size {self.hidden_size} must split into {self.num_heads} heads of even size")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        if self.vocab_size <= _BYTE_ALPHABET + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size {self.vocab_size} leaves no room for merges")
        if self.init_std <= 0:
            raise ValueError(f"init_std must be positive, got {self.init_std}")
        if self.dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(TORCH_DTYPES)}, got {self.dtype!r}")


def tiny_spec(**overrides: object) -> DemoSpec:
    """A spec small enough that tests build a model in a temporary directory in well under a second."""
    tiny = DemoSpec(
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=512,
        # Same logit scale as the default (std * sqrt(hidden) ~ 1.1-1.6). Measured over 10 prompts x 32 greedy
        # tokens, seeds 0-2: 0.05-0.1 loop (2-20 distinct tokens), 0.2 gives 24-31 distinct with gap median 0.35,
        # against a 1.5e-5 fp32 difference between cached decoding and a full forward.
        init_std=0.2,
        dtype="float32",
    )
    return replace(tiny, **overrides)


def ensure_demo_model(out_dir: Path, spec: DemoSpec | None = None) -> Path:
    """Build the demo model (default: DemoSpec()) into out_dir unless a finished build, its config.json, is there."""
    out_dir = Path(out_dir)
    if not (out_dir / "config.json").is_file():
        build_demo_model(out_dir, spec)
    return out_dir


def build_demo_model(out_dir: Path, spec: DemoSpec | None = None) -> Path:
    """Write config.json, model.safetensors, generation_config.json and the tokenizer files into out_dir.

    Everything is written into a temporary directory beside out_dir and then moved into place with config.json
    last, so a build that is interrupted leaves no config.json and is redone by ensure_demo_model.
    """
    spec = spec if spec is not None else DemoSpec()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would otherwise become out_dir's mode
    try:
        _write_checkpoint(staging, spec)
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _write_checkpoint(out_dir: Path, spec: DemoSpec) -> None:
    tokenizer = build_tokenizer(spec.vocab_size, spec.max_position_embeddings)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)  # chat_template inside tokenizer_config.json
    dtype = TORCH_DTYPES[spec.dtype]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    model = LlamaForCausalLM(config)  # built in float32: the seeded draw is the same whatever dtype is saved
    _init_weights(model, spec.init_std, spec.seed)
    model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(out_dir)


def _init_weights(model: nn.Module, std: float, seed: int) -> None:
    """Draw every linear and embedding weight from N(0, std) with a generator seeded by `seed`; norms get ones."""
    generator = torch.Generator().manual_seed(seed)
    initialised: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, LlamaRMSNorm):
                module.weight.fill_(1.0)
            else:
                continue
            initialised.add(id(module.weight))
    missed = [name for name, p in model.named_parameters() if id(p) not in initialised]
    if missed:
        raise RuntimeError(f"demo model parameters left uninitialised: {missed}")


def _publish(staging: Path, out_dir: Path) -> None:
    """Move a finished build from staging to out_dir; config.json, which marks a complete build, goes last."""
    try:
        staging.rename(out_dir)  # out_dir absent or empty: one atomic step
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    config = out_dir / "config.json"
    config.unlink(missing_ok=True)  # an interruption from here on leaves out_dir marked unfinished
    for path in sorted(staging.iterdir()):
        if path.name != config.name:
            os.replace(path, out_dir / path.name)
    os.replace(staging / config.name, config)


def build_tokenizer(vocab_size: int, model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the demo's special tokens and chat template; trained once per vocab_size."""
    if vocab_size not in _TOKENIZERS:
        _TOKENIZERS[vocab_size] = _train_bpe(vocab_size).to_str()
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_TOKENIZERS[vocab_size]),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=list(ROLE_TOKENS),
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
    )


def _train_bpe(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_stdlib_texts(vocab_size), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def _stdlib_texts(vocab_size: int) -> Iterator[str]:
    """The first files of the sorted top-level stdlib sources: more of them for larger vocabularies."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[: min(_MAX_CORPUS_FILES, max(16, vocab_size // 32))]
    for path in files:
        try:
            yield path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
