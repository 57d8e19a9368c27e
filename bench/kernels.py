"""Micro-benchmark of the adapter kernels on one decode step: `python -m switchboard.bench.kernels`.

T = 32 decode tokens spread over 1 / 4 / 32 distinct adapters (token t uses the (t mod k)-th one, slots scattered
over a pool of 32), LoRA r = 16, in = out = 512, bfloat16. Prints the median time per call of the base linear
`x @ W.T` of the same shape (the dense baseline), the fast torch path with row-major and with k-major slots, a
gather of per-token A and B followed by bmm (the form the kernels avoid), the float32 reference loop, and Triton
where a CUDA device is present; then KronA and (IA)3 on the same batch, by torch and, on a CPU where they build, by
the compiled ops.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import torch

from switchboard.kernels import kron, scale, sgmv
from switchboard.kernels.backend import Backend, default_backend, get_kernels
from switchboard.kernels.segments import Segments, build_segments

from .timing import best_median_us


def _gather_bmm(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, seg: Segments) -> torch.Tensor:
    """Per-token copies of A and B, then two bmm: what DESIGN.md §5 measured, for comparison only."""
    slots = seg.token_slots.clamp(min=0)  # every token has an adapter in this benchmark
    h = torch.bmm(A.index_select(0, slots), x.unsqueeze(2))  # [T, r, 1]
    return y.add_(torch.bmm(B.index_select(0, slots), h).squeeze(2))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--pool", type=int, default=32, help="resident slots")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    T, r, d, S = args.tokens, args.rank, args.hidden, args.pool

    x = torch.randn(T, d, dtype=dtype, device=device)
    W = torch.randn(d, d, dtype=dtype, device=device) / d**0.5
    A = torch.randn(S, r, d, dtype=dtype, device=device) / d**0.5  # row-major [S, r, in]
    B = torch.randn(S, d, r, dtype=dtype, device=device) / r**0.5  # row-major [S, out, r]
    A_k = sgmv.to_k_major(A)  # a view of [S, in, r]
    B_k = sgmv.to_k_major(B)  # a view of [S, r, out]
    W1 = torch.randn(S, 8, 8, dtype=dtype, device=device) / 8**0.5  # KronA 512 = 8 x 64
    W2 = torch.randn(S, d // 8, d // 8, dtype=dtype, device=device) / (d // 8) ** 0.5
    V = torch.randint(0, 2, (S, d), device=device).to(dtype) * 2 - 1  # +-1: y keeps its scale over many calls
    y = torch.zeros(T, d, dtype=dtype, device=device)
    triton = get_kernels(Backend.TRITON) if default_backend(device) is Backend.TRITON else None
    compiled = get_kernels(Backend.COMPILED_CPU) if default_backend(device) is Backend.COMPILED_CPU else None

    print(f"T={T} decode tokens, r={r}, in=out={d}, {args.dtype}, {S} resident slots, {args.threads} threads, {device}")
    print("best-of-3 median us per call; x dense = time / time of the base linear x @ W.T")
    for k in (1, 4, 32):
        chosen = [(7 * j + 3) % S for j in range(k)]  # scattered over the pool
        seg = build_segments([chosen[t % k] for t in range(T)], device=device)
        rows: dict[str, Callable[[], object]] = {
            "dense x @ W.T": functools.partial(torch.matmul, x, W.t()),
            "lora fast, row-major slots": functools.partial(sgmv.lora_apply, y, x, A, B, seg),
            "lora fast, k-major slots": functools.partial(sgmv.lora_apply, y, x, A_k, B_k, seg),
            "lora gather+bmm (per-token copies)": functools.partial(_gather_bmm, y, x, A, B, seg),
            "lora reference (float32 loop)": functools.partial(sgmv.lora_apply_ref, y, x, A, B, seg),
            "krona fast (W1 8x8, W2 64x64)": functools.partial(kron.kron_apply, y, x, W1, W2, seg),
            "ia3 fast": functools.partial(scale.segmented_scale, y, V, seg),
        }
        if triton is not None:
            rows["lora triton"] = functools.partial(triton.lora_apply, y, x, A, B, seg)
        if compiled is not None:
            rows["krona compiled (C++)"] = functools.partial(compiled.kron_apply, y, x, W1, W2, seg)
            rows["ia3 compiled (C++)"] = functools.partial(compiled.segmented_scale, y, V, seg)
        times = best_median_us(rows, device)
        dense = times["dense x @ W.T"]
        print(f"\n{k} distinct adapter(s)")
        for name, us in times.items():
            print(f"  {name:<38} {us:9.1f} us   x{us / dense:5.2f} dense")


if __name__ == "__main__":
    main()
