"""The native engine on a SmolLM2-135M-shaped model (random bf16 weights: throughput only) with 32 distinct LoRA
adapters, per kernel backend: `python -m switchboard.bench.gpu_lora --device cuda` (docs/scaling.md's GPU table).

32 requests x 64 prompt tokens, 64 new tokens, greedy, EOS ignored; base model, one LoRA for all, 32 distinct LoRA
r=8 on q, k, v, o; best of three runs after a warm-up. Needs no download: the model and adapters are built here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from switchboard.adapters_store import synthetic
from switchboard.adapters_store.kinds.base import ATTENTION, BaseModelShape
from switchboard.kernels.backend import Backend
from switchboard.serving.config import ServeConfig
from switchboard.serving.demo import build_tokenizer
from switchboard.serving.engine import llm_engine
from switchboard.serving.engine.request import SamplingParams

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)  # fmt: skip


def build(root: Path, layers: int, num_adapters: int) -> dict[str, Path]:
    """The model under root/model and `num_adapters` seeded LoRA adapters beside it; name -> adapter directory."""
    cfg = LlamaConfig(**(SMOLLM2_135M | {"num_hidden_layers": layers}))
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(root / "model")
    build_tokenizer(8192).save_pretrained(root / "model")  # prompts are token ids below 8000
    base = BaseModelShape.from_hf_config(cfg.to_dict())
    adapters = {}
    for i in range(num_adapters):
        d = root / "adapters" / f"a{i}"
        d.mkdir(parents=True)
        for name, data in synthetic.lora_files(base, rank=8, modules=ATTENTION, seed=i).items():
            (d / name).write_bytes(data)
        adapters[f"a{i}"] = d
    return adapters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path("bench-results/gpu_lora.json"))
    args = p.parse_args()
    cuda = args.device == "cuda"
    root = Path(tempfile.mkdtemp(prefix="gpu-lora-"))
    try:
        adapters = build(root, args.layers, 32)
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(10, 8000, (64,), generator=g).tolist() for _ in range(32)]
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        warm = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        results = []
        for backend in (Backend.TRITON, Backend.TORCH) if cuda else (Backend.TORCH,):
            llm_engine.default_backend = lambda device, b=backend: b  # the one backend under test
            config = ServeConfig(model=root / "model", device=args.device, dtype="bfloat16", adapters=adapters,
                                 max_resident_adapters=32, max_num_seqs=64, kv_cache_gb=2.0)  # fmt: skip
            engine = llm_engine.LLMEngine(config)
            for label, ids in (("base", None), ("same LoRA", ["a0"] * 32), ("32 distinct LoRA", list(adapters))):
                engine.generate(prompts[:4], warm, ids and ids[:4])
                best = 0.0
                for _ in range(3):
                    if cuda:
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    tokens = engine.generate(prompts, params, ids)
                    if cuda:
                        torch.cuda.synchronize()
                    best = max(best, sum(map(len, tokens)) / (time.perf_counter() - start))
                results.append({"backend": backend.value, "config": label, "tok_s": round(best, 1)})
                print(results[-1], flush=True)
            del engine
        device = torch.cuda.get_device_name() if cuda else "cpu"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": device, "torch": torch.__version__, "results": results}, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
