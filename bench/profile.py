"""`switchboard profile`: what unmerged adapters cost, against the base model and against merging, in one run.

Every configuration runs the same workload (N concurrent requests, P prompt tokens, M new tokens, greedy, EOS
ignored) on a fresh engine over the same base checkpoint; the figure of merit is decode throughput (generated
tokens per second over the decode steps), printed as a ratio to the base model: each run of a configuration is
paired with a base run just before it, and the ratio is the median over the pairs.
Adapters are PEFT directories: one is built with PEFT per configuration, and the others are seeded copies of it
with fresh tensors of the same names and shapes (32 distinct adapters cost a second, not 32 PEFT builds).
The table is measured for each batch size (`--batch-sizes`, default 1, 8, 32) on the same engines, beside the memory
each configuration holds (base weights, adapter weights at the serving dtype, the workload's KV cache). The report
is written as profile.json, profile.md and profile.png; `--peer-url` adds the same workload against another
OpenAI-compatible server (such as vLLM), side by side.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig
from safetensors.torch import load_file, save_file

from switchboard.adapters_store.kinds.base import ALL_LINEAR, ATTENTION
from switchboard.serving.config import ServeConfig
from switchboard.serving.demo_adapters import build_adapter, demo_configs
from switchboard.serving.engine.llm_engine import LLMEngine, load_tokenizer
from switchboard.serving.engine.request import SamplingParams

from .engine import hf_generate, make_prompts

# KronA, (IA)3 and prefix as the demo adapters configure them (one source: serving/demo_adapters.py).
OTHER_FAMILIES: dict[str, PeftConfig] = {
    kind: config for name, config in demo_configs().items() if (kind := name.removeprefix("demo-")) != "lora"
}
PREFIX_TOKENS = OTHER_FAMILIES["prefix"].num_virtual_tokens


def adapter_families(lora_ranks: list[int]) -> dict[str, PeftConfig]:
    """LoRA at each rank on attention and on all linear layers (alpha = 2r), then KronA, (IA)3 and prefix."""
    families: dict[str, PeftConfig] = {}
    for r in lora_ranks:
        for where, targets in (("attn", ATTENTION), ("all", ALL_LINEAR)):
            families[f"lora-r{r}-{where}"] = LoraConfig(
                r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False
            )
    return families | OTHER_FAMILIES


def kind_families(lora_ranks: list[int]) -> dict[str, str]:
    """The family that stands for each kind in the mixed configuration: LoRA r=16 on attention where measured."""
    r = 16 if 16 in lora_ranks else lora_ranks[0]
    return {"lora": f"lora-r{r}-attn", "krona": "krona", "ia3": "ia3", "prefix": "prefix"}


@dataclass(slots=True)
class Measurement:
    name: str
    description: str
    batch_size: int
    decode_tok_s: float
    total_tok_s: float
    runs: list[float]
    ratio_to_base: float  # median over runs paired with a base run just before


def seeded_copies(src: Path, out_root: Path, count: int, seed: int) -> list[Path]:
    """`count` adapters with `src`'s config and tensor shapes, and fresh seeded values of similar scale."""
    tensors = load_file(src / "adapter_model.safetensors")
    config = (src / "adapter_config.json").read_text()
    out = [src]
    for i in range(1, count):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        fresh = {}
        for name, t in tensors.items():
            noise = torch.randn(t.shape, generator=g)
            fresh[name] = (1.0 + 0.5 * noise) if "ia3_l" in name else noise * t.float().std().clamp_min(1e-3)
        d = out_root / f"{src.name}-{i}"
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in fresh.items()}, d / "adapter_model.safetensors")
        (d / "adapter_config.json").write_text(config)
        out.append(d)
    return out


def memory_bytes(engine: LLMEngine, adapter_dirs: list[Path], batch_size: int, tokens_per_seq: int) -> dict:
    """What one configuration holds: base weights, its adapters' weights at the serving dtype, and the KV cache
    blocks the workload's sequences occupy (the pool allocated is reported beside it)."""
    dtype_size = torch.empty((), dtype=engine.config.torch_dtype).element_size()
    adapters = 0
    for d in adapter_dirs:
        adapters += sum(t.numel() for t in load_file(d / "adapter_model.safetensors").values()) * dtype_size
    kv = engine.kv_cache
    per_block = kv.data.numel() * kv.data.element_size() // kv.num_blocks
    blocks_per_seq = -(-tokens_per_seq // kv.block_size)
    return {
        "base_weights": sum(p.numel() * p.element_size() for p in engine.model.parameters()),
        "adapters": adapters,
        "kv_cache_workload": batch_size * blocks_per_seq * per_block,
        "kv_cache_allocated": kv.data.numel() * kv.data.element_size(),
    }


def _warm_up(engine: LLMEngine, prompts: list[list[int]], adapter_ids: list[str | None]) -> None:
    # The same batch shape as the measurement: the first GEMM of each shape pays for its set-up (oneDNN).
    engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), adapter_ids)


def _measure(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, adapter_ids: list[str | None]
) -> tuple[float, float]:
    """(decode tokens/s, generated tokens/s including prefill) for one run of the workload."""
    for i, (p, a) in enumerate(zip(prompts, adapter_ids, strict=True)):
        engine.add_request(f"profile-{i}", p, params, a)
    t0 = time.perf_counter()
    decode_time = decode_tokens = 0.0
    while engine.has_unfinished():
        t = time.perf_counter()
        is_decode = not engine.scheduler.waiting and all(s.num_uncomputed == 1 for s in engine.scheduler.running)
        outs = engine.step()
        if is_decode:
            decode_time += time.perf_counter() - t
            decode_tokens += len(outs)
    total = time.perf_counter() - t0
    return decode_tokens / decode_time, len(prompts) * params.max_tokens / total


def peft_mixed_batch(model_dir: Path, adapter_dirs: list[Path], prompts: list[list[int]], args) -> float:
    """PEFT's mixed-batch `generate(adapter_names=...)` on the same workload: generated tokens per second."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).eval()
    model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name="a0")
    for i, d in enumerate(adapter_dirs[1:], start=1):
        model.load_adapter(d, adapter_name=f"a{i}")
    names = [f"a{i % len(adapter_dirs)}" for i in range(len(prompts))]

    def run(new_tokens: int) -> float:
        t0 = time.perf_counter()
        return hf_generate(model, prompts, new_tokens, adapter_names=names) / (time.perf_counter() - t0)

    with torch.inference_mode():
        run(2)  # warm-up
        return run(args.max_tokens)


def _configurations(
    families: dict[str, list[Path]], args: argparse.Namespace
) -> list[tuple[str, str, dict[str, Path], str | None]]:
    """(name, description, adapters, merged adapter) of every configuration, base first."""
    configs: list[tuple[str, str, dict[str, Path], str | None]] = [("base", "base model only", {}, None)]
    one = "lora-r16-all" if "lora-r16-all" in families else next(iter(families), None)
    if one is not None and one != "prefix":
        single = {"a0": families[one][0]}
        configs.append(("merged", f"one {one} adapter merged", single, "a0"))
        configs.append(("unmerged-1", f"one {one} adapter unmerged, all requests", single, None))
    for family, dirs in sorted(families.items()):
        adapters = {f"{family}-{i}": d for i, d in enumerate(dirs)}
        configs.append((family, f"{len(adapters)} distinct {family} unmerged", adapters, None))
    # One adapter of each family for every request: the like-for-like with the survey's merged-versus-unmerged
    # figures (the distinct rows add each adapter's weights to the bytes a step reads).
    for family, dirs in sorted(families.items()):
        if family != one:  # `unmerged-1` above is this row for `one`
            configs.append((f"{family}-one", f"one {family} adapter unmerged, all requests", {"a0": dirs[0]}, None))
    if "mixed" in args.kinds:
        mixed: dict[str, Path] = {}
        per_kind = max(1, args.num_adapters // 4)
        for family in kind_families(lora_ranks(args)).values():
            mixed |= {f"{family}-{i}": d for i, d in enumerate(families[family][:per_kind])}
        configs.append(("mixed", f"{len(mixed)} adapters of all four kinds", mixed, None))
    return configs


def _request_adapters(name: str, adapters: dict[str, Path], merge: str | None, n: int) -> list[str | None]:
    """Each request's adapter: none for the base (and the merged model), else round robin over the adapters."""
    if name == "base" or merge is not None:
        return [None] * n if name == "base" else [merge] * n
    names = list(adapters)
    return [names[i % len(names)] for i in range(n)]


def _measure_batch_size(
    configs: list, engines: list[LLMEngine], prompts: list[list[int]], params: SamplingParams, repeats: int
) -> list[Measurement]:
    """The paired table for one batch size: each configuration runs right after a base run, `repeats` times."""
    n = len(prompts)
    ids = [_request_adapters(name, adapters, merge, n) for name, _, adapters, merge in configs]
    for eng, request_ids in zip(engines, ids, strict=True):
        _warm_up(eng, prompts, request_ids)
    # Paired measurements: each configuration runs right after a run of the base model, and its ratio is the
    # median of those pairs, so that drift of a shared 2-core machine cancels instead of biasing the table.
    runs: list[list[tuple[float, float]]] = [[] for _ in configs]
    ratios: list[list[float]] = [[] for _ in configs]
    for r in range(repeats):
        for i, eng in enumerate(engines):
            if i == 0:
                continue
            print(f"[profile] batch {n}, round {r + 1}/{repeats}: base, then {configs[i][0]}", flush=True)
            base_run = _measure(engines[0], prompts, params, ids[0])
            run = _measure(eng, prompts, params, ids[i])
            runs[0].append(base_run)
            runs[i].append(run)
            ratios[i].append(run[0] / base_run[0])
    ratios[0] = [1.0]
    return [
        Measurement(
            name,
            description,
            batch_size=n,
            decode_tok_s=statistics.median(d for d, _ in runs[i]),
            total_tok_s=statistics.median(t for _, t in runs[i]),
            runs=[d for d, _ in runs[i]],
            ratio_to_base=statistics.median(ratios[i]),
        )
        for i, (name, description, _, _) in enumerate(configs)
    ]


def _print_table(results: list[Measurement], workload: str, args: argparse.Namespace, model_dir: Path) -> None:
    print(f"\nWorkload: {workload}; {args.dtype}; model {model_dir}; {torch.get_num_threads()} threads")
    print("| configuration | decode tok/s | generated tok/s (incl. prefill) | decode ratio to base (paired) |")
    print("|---|---|---|---|")
    for m in results:
        print(f"| {m.description} | {m.decode_tok_s:.0f} | {m.total_tok_s:.0f} | {m.ratio_to_base:.2f} |")


def lora_ranks(args: argparse.Namespace) -> list[int]:
    """--lora-ranks as integers, e.g. "8,16" -> [8, 16]."""
    ranks = sorted({int(x) for x in args.lora_ranks.split(",") if x})
    if not ranks or ranks[0] < 1:
        raise ValueError("--lora-ranks: positive integers, e.g. 8,16")
    return ranks


def batch_sizes(args: argparse.Namespace) -> list[int]:
    """--batch-sizes, else --num-requests alone, else 1, 8 and 32."""
    if args.batch_sizes:
        sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    elif args.num_requests is not None:
        sizes = [args.num_requests]
    else:
        sizes = [1, 8, 32]
    if not sizes or min(sizes) < 1:
        raise ValueError("--batch-sizes: positive integers, e.g. 1,8,32")
    return sorted(set(sizes))


def run_profile(args: argparse.Namespace, model_dir: Path) -> dict:
    sizes, repeats = batch_sizes(args), args.repeats
    tok = load_tokenizer(model_dir)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    work = args.out / "adapters"
    families: dict[str, list[Path]] = {}
    ranks = lora_ranks(args)
    all_families, by_kind = adapter_families(ranks), kind_families(ranks)
    wanted = {by_kind[k] for k in args.kinds if k in by_kind} | {
        f for f in all_families if f.startswith("lora") and "lora" in args.kinds
    }
    if "mixed" in args.kinds:
        wanted |= set(by_kind.values())
    for seed, family in enumerate(sorted(wanted), start=1):
        print(f"[profile] building {args.num_adapters} {family} adapters", flush=True)
        first = build_adapter(model_dir, all_families[family], work / family, seed)
        families[family] = seeded_copies(first, work, args.num_adapters, seed)

    # Without --kv-cache-gb, each engine's pool holds the largest batch whole (prefix tokens included), so that no
    # run is slowed by preemption, and no more: every engine stays loaded.
    block_size = next(f.default for f in fields(ServeConfig) if f.name == "block_size")
    kv_blocks = max(sizes) * -(-(args.prompt_len + args.max_tokens + PREFIX_TOKENS) // block_size) + 4

    def engine(adapters: dict[str, Path], merge: str | None = None) -> LLMEngine:
        cfg = ServeConfig(
            model=model_dir,
            dtype=args.dtype,
            max_num_seqs=max(64, *sizes),
            adapters=adapters,
            merge_adapter=merge,
            max_resident_adapters=max(32, args.num_adapters),
            kv_cache_gb=args.kv_cache_gb or 1.0,
            num_kv_blocks=None if args.kv_cache_gb else kv_blocks,
        )
        return LLMEngine(cfg)

    configs = _configurations(families, args)
    # All engines stay loaded (small KV pools) and are measured round-robin, so that drift of the machine
    # (other load, frequency) spreads over every configuration instead of biasing whichever ran first.
    engines = []
    for name, description, adapters, merge in configs:
        print(f"[profile] loading {name}: {description}", flush=True)
        engines.append(engine(adapters, merge))
    by_size: dict[int, list[Measurement]] = {}
    prompts_of: dict[int, list[list[int]]] = {}
    for n in sizes:
        prompts_of[n] = make_prompts(tok, n, args.prompt_len)
        by_size[n] = _measure_batch_size(configs, engines, prompts_of[n], params, repeats)
        workload = f"{n} concurrent requests x {args.prompt_len} prompt tokens, {args.max_tokens} new tokens, greedy"
        _print_table(by_size[n], workload, args, model_dir)
    largest = max(sizes)
    memory = {
        # a merged adapter lives inside the base weights: it holds no adapter memory of its own
        name: memory_bytes(eng, [] if merge else list(adapters.values()), largest, args.prompt_len + args.max_tokens)
        for (name, _, adapters, merge), eng in zip(configs, engines, strict=True)
    }
    results = by_size[largest]
    workload = f"{largest} concurrent requests x {args.prompt_len} prompt tokens, {args.max_tokens} new tokens, greedy"
    peft_row = None
    if args.peft_baseline and "lora-r8-attn" in families:
        print("[profile] PEFT mixed batch, 32 distinct lora-r8-attn adapters (same workload)", flush=True)
        peft_tok_s = peft_mixed_batch(model_dir, families["lora-r8-attn"], prompts_of[largest], args)
        ours = next(m for m in results if m.name == "lora-r8-attn")
        peft_row = {"peft_tok_s": peft_tok_s, "switchboard_tok_s": ours.total_tok_s, "batch_size": largest}
        print(
            f"\nSide by side, {len(families['lora-r8-attn'])} distinct LoRA r=8 on q,k,v,o, generated tok/s incl. "
            f"prefill: PEFT generate(adapter_names=...) {peft_tok_s:.0f}, switchboard {ours.total_tok_s:.0f} "
            f"({ours.total_tok_s / peft_tok_s:.1f}x)"
        )
    del engines  # free the engines' KV pools before a peer run loads the machine
    peer = None
    if args.peer_url:
        from switchboard.loadtest.peer import run_peer

        from .profile_report import peer_table

        peer = run_peer(args.peer_url, sizes, args.prompt_len, args.max_tokens, args.repeats, args.peer_adapters)
        print("\n" + "\n".join(peer_table({str(n): [asdict(m) for m in ms] for n, ms in by_size.items()}, peer)))
    report = {
        "workload": workload,
        "dtype": args.dtype,
        "model": str(model_dir),
        "threads": torch.get_num_threads(),
        "machine": platform.processor(),
        "batch_sizes": sizes,
        "results": [asdict(m) for m in results],
        "by_batch_size": {str(n): [asdict(m) for m in ms] for n, ms in by_size.items()},
        "memory_bytes": memory,
        "memory_batch_size": largest,
        "peft_mixed_batch": peft_row,
        "peer": peer,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(json.dumps(report, indent=2))
    from .profile_report import write_profile_report

    md, png = write_profile_report(report, args.out)
    print(f"\nJSON: {args.out / 'profile.json'}; Markdown: {md}; plot: {png}")
    return report
