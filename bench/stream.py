"""How fast the compiled LoRA op reads adapter weights from memory: `python -m switchboard.bench.stream`.

With 32 distinct adapters in a decode batch, each step reads every adapter's stacks once, more bytes than the
caches hold, so the op's cost is how fast it streams them. This measures one step's LoRA work on the demo model's
shapes (per layer q|k|v and o, and with `--all-linear` also gate|up and down; 32 decode tokens, bf16), with the
caches flushed before each step as the rest of a real step does (base weights and KV cache are larger than L3):

- the op with 32 distinct adapters (every slot read), from the raw stacks and from coded ones (`bf16_codec`: 12
  bits a weight; where the op has its AVX-512 decoder), and with one adapter for every token (compute, no
  streaming);
- `torch.sum` over the same stacks, flushed the same way: what this machine's memory gives a plain read.

Prints the median per step and GB/s over the stacks' bytes. Then, for each, what the step costs the rest of a real
step: a working set (6 MiB by default, standing for the interpreter's objects, activations and the like) is read
just before the step and again after it; the re-read's time is printed beside its time with nothing in between.
The op streams weights it reads once with non-temporal prefetches, so that it evicts less of that working set than
a plain read does. Runs on the CPU only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from switchboard.kernels import bf16_codec, cpu_adapters


@dataclass(frozen=True, slots=True)
class PackedStacks:
    """One packed linear's k-major stacks, as the op takes them."""

    A: torch.Tensor  # [S, in, W]
    Bs: list[torch.Tensor]  # per part [S, r, out]
    cols: list[int]
    rows: list[int]
    coded: list[torch.Tensor]  # A's and each B's coded stack (`bf16_codec`)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.A, *self.Bs))


def make_stacks(ins: int, outs: list[int], slots: int, r: int, dtype: torch.dtype) -> PackedStacks:
    A = torch.randn(slots, ins, len(outs) * r).to(dtype) / ins**0.5
    Bs = [torch.randn(slots, r, o).to(dtype) / r**0.5 for o in outs]
    cols = [sum(outs[:p]) for p in range(len(outs))]
    coded = [bf16_codec.coded_stack(raw) for raw in [A, *Bs]] if dtype == torch.bfloat16 else []
    return PackedStacks(A, Bs, cols, [p * r for p in range(len(outs))], coded)


def median_step_s(step: Callable[[], object], flush: torch.Tensor, repeats: int) -> float:
    """Median wall time of `step`, each run after reading `flush` (larger than the caches)."""
    times = []
    for _ in range(repeats):
        flush.sum()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def median_reread_s(step: Callable[[], object], flush: torch.Tensor, working_set: torch.Tensor, repeats: int) -> float:
    """Median time to read `working_set` again right after `step`, having read it (twice) just before."""
    times = []
    for _ in range(repeats):
        flush.sum()
        working_set.sum()
        working_set.sum()
        step()
        t0 = time.perf_counter()
        working_set.sum()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--all-linear", action="store_true", help="also gate|up and down (default: attention only)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--flush-mib", type=int, default=256, help="read between steps to evict the caches")
    p.add_argument("--working-set-mib", type=int, default=6, help="read before and after each step (see above)")
    args = p.parse_args(argv)
    if not cpu_adapters.compiled_adapters_available():
        raise SystemExit(f"the compiled ops are not built here: {cpu_adapters.compiled_adapters_unavailable_reason()}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, m, r, S, T, dt = args.hidden, args.intermediate, args.rank, args.adapters, args.tokens, torch.bfloat16
    shapes = [(d, [d, d, d]), (d, [d])]  # q|k|v, o
    if args.all_linear:
        shapes += [(d, [m, m]), (m, [d])]  # gate|up, down
    layers = [[make_stacks(i, o, S, r, dt) for i, o in shapes] for _ in range(args.layers)]
    stacks = [s for layer in layers for s in layer]
    nbytes = sum(s.nbytes for s in stacks)
    x = {i: torch.randn(T, i).to(dt) for i, _ in shapes}
    y = {sum(o): torch.zeros(T, sum(o), dtype=dt) for _, o in shapes}
    flush = torch.ones(args.flush_mib * 2**20 // 4)
    working_set = torch.ones(args.working_set_mib * 2**20 // 4)

    def lora_step(token_slots: torch.Tensor, coded: bool) -> Callable[[], None]:
        def step() -> None:
            for s in stacks:
                ins, out = s.A.shape[1], sum(B.shape[2] for B in s.Bs)
                cpu_adapters.lora_packed_gather_lists(
                    y[out], x[ins], token_slots, s.A, s.Bs, s.cols, s.rows, r, s.coded if coded else []
                )

        return step

    def plain_read() -> None:
        for s in stacks:
            s.A.sum()
            for B in s.Bs:
                B.sum()

    distinct = torch.arange(T) % S
    rows = {f"LoRA op, {S} distinct adapters": lora_step(distinct, coded=False)}
    if cpu_adapters.coded_slots_pay():
        rows[f"LoRA op, {S} distinct, coded slots"] = lora_step(distinct, coded=True)
    rows["LoRA op, one adapter for every token"] = lora_step(torch.zeros(T, dtype=torch.int64), coded=False)
    rows["torch.sum over the same stacks"] = plain_read
    where = "all linear layers" if args.all_linear else "attention (q|k|v, o)"
    print(
        f"{args.layers} layers, LoRA r={r} on {where}, {S} slots: {nbytes / 2**20:.1f} MiB of stacks; {T} decode "
        f"tokens, bf16, {args.threads} threads, caches flushed ({args.flush_mib} MiB read) before each step"
    )
    for fn in rows.values():  # warm-up: builds, page faults
        fn()
    times = dict.fromkeys(rows, float("inf"))
    rereads = dict.fromkeys([*rows, ""], float("inf"))  # "": nothing between the reads
    for _ in range(3):  # interleaved rounds, best median: robust to a moment's other work
        for name, fn in rows.items():
            times[name] = min(times[name], median_step_s(fn, flush, args.repeats // 3 + 1))
        for name, fn in [*rows.items(), ("", lambda: None)]:
            rereads[name] = min(rereads[name], median_reread_s(fn, flush, working_set, args.repeats // 3 + 1))
    print(
        f"  ({args.working_set_mib} MiB working set read just before each step: reading it again takes "
        f"{rereads[''] * 1e6:.0f} us with nothing in between)"
    )
    for name, t in times.items():
        print(
            f"  {name:<40} {t * 1e3:7.3f} ms per step   {nbytes / t / 1e9:6.1f} GB/s over the stacks   "
            f"working set again after it: {rereads[name] * 1e6:5.0f} us"
        )


if __name__ == "__main__":
    main()
