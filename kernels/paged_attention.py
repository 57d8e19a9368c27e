"""Paged decode attention on the CPU: each sequence's one query attends to its context, read in place from the cache.

The torch path gathers every sequence's context out of the paged cache (`index_select` -> [B, L, KV, D]) before
attending, so the context is read, written and read again. The C++ kernel here reads each cached row once where it
lies: one task per sequence (threads take tasks off a shared counter, so ragged contexts balance), its keys in one
pass for all heads (a slot's row of KV * D elements is contiguous, and a block's rows follow one another), a
max-subtracted softmax in float32, then its values in a second pass. It is compiled on first use with
`torch.utils.cpp_extension.load_inline` (a C++ compiler and ninja; about 10 s on two cores) into
~/.cache/switchboard/torch_extensions/, keyed by a hash of the source, flags, torch version and CPU, so later
processes load it at once. Where it cannot be built, `paged_decode_attention` runs the reference after one warning.

- paged_decode_attention_ref: the spec, the fallback and the test oracle (gather + float32 softmax)
- paged_decode_attention: the compiled kernel (CPU tensors), or the reference
- compiled_paged_attention_available, compiled_paged_attention_unavailable_reason: whether the kernel is built
  here, and if not why (both build it on the first call)
- `python -m switchboard.kernels.paged_attention`: micro-benchmark against the reference and the serving path
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .cpp_build import build_ops

_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdint>
#include <vector>

namespace {

// One cache row as float32: float32 rows are read in place, bf16 and fp16 rows converted into `buf`.
inline const float* row_f32(const float* src, float*, int64_t) { return src; }

inline const float* row_f32(const c10::BFloat16* src, float* buf, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) buf[i] = std::bit_cast<float>(uint32_t(s[i]) << 16);  // bf16: top half of f32
  return buf;
}

inline const float* row_f32(const c10::Half* src, float* buf, int64_t n) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
  return buf;
}

inline void prefetch_row(const void* row, int64_t bytes) {
  for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch(static_cast<const char*>(row) + c);
}

// exp(x) for x <= 0 (a score minus its maximum), in plain arithmetic that gcc vectorises: 2^n * exp(r) with
// |r| <= ln(2) / 2 and Cephes' expf polynomial (relative error about 2e-7); 0 below -87, NaN kept.
inline float exp_nonpositive(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float n = float(-int32_t(0.5f - xc * 1.44269504088896341f));  // nearest: truncates a positive
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float two_n = std::bit_cast<float>(uint32_t(int32_t(n) + 127) << 23);
  return x < -87.0f ? 0.0f : (x == x ? p * two_n : x);  // NaN stays NaN
}

// Dot product of two float32 rows (D known at compile time for the common head sizes).
template <int64_t DC>
inline float dot(const float* a, const float* b, int64_t D) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < (DC > 0 ? DC : D); ++d) s += a[d] * b[d];
  return s;
}

// q and out rows are few (H * D per sequence): converted by dtype at run time.
template <typename T>
inline void load_scaled(const void* src, float scale, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(static_cast<const T*>(src)[i]) * scale;
}

inline void load_q(const void* src, at::ScalarType t, float scale, float* dst, int64_t n) {
  switch (t) {
    case at::kBFloat16: return load_scaled<c10::BFloat16>(src, scale, dst, n);
    case at::kHalf: return load_scaled<c10::Half>(src, scale, dst, n);
    default: return load_scaled<float>(src, scale, dst, n);
  }
}

template <typename T>
inline void store_scaled(const float* src, float scale, void* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) static_cast<T*>(dst)[i] = static_cast<T>(src[i] * scale);
}

inline void store_out(const float* src, float scale, void* dst, at::ScalarType t, int64_t n) {
  switch (t) {
    case at::kBFloat16: return store_scaled<c10::BFloat16>(src, scale, dst, n);
    case at::kHalf: return store_scaled<c10::Half>(src, scale, dst, n);
    default: return store_scaled<float>(src, scale, dst, n);
  }
}

template <int64_t DC, typename KT>
void decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
            const at::Tensor& ctx_lens, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = DC > 0 ? DC : q.size(2), KV = k_cache.size(1), L = slots.size(1);
  const int64_t G = H / KV, R = KV * D, esize = q.element_size();  // R: one slot's row, all kv heads
  const int64_t q_sb = q.stride(0) * esize, q_sh = q.stride(1) * esize;
  const at::ScalarType qt = q.scalar_type();
  const char* qp = static_cast<const char*>(q.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const KT* k = k_cache.data_ptr<KT>();
  const KT* v = v_cache.data_ptr<KT>();
  const int64_t* all_slots = slots.data_ptr<int64_t>();
  const int64_t* lens = ctx_lens.data_ptr<int64_t>();
  constexpr int64_t PF = 2;  // rows prefetched ahead: a block's rows are contiguous, the next block anywhere
  std::atomic<int64_t> next{0};
  // One worker per thread, each taking sequences off a shared counter (contexts are ragged).
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> qf(H * D), acc(H * D), scores(H * L), denom(H), rbuf(R);
    for (int64_t w = w0; w < w1; ++w) {
      for (int64_t b = next.fetch_add(1); b < B; b = next.fetch_add(1)) {
        const int64_t n = lens[b];
        const int64_t* sl = all_slots + b * L;
        for (int64_t hq = 0; hq < H; ++hq) load_q(qp + b * q_sb + hq * q_sh, qt, scale, qf.data() + hq * D, D);
        // Scores: each key row is read once, in place, for the G query heads that share it.
        for (int64_t l = 0; l < n; ++l) {
          if (l + PF < n) prefetch_row(k + sl[l + PF] * R, R * sizeof(KT));
          const float* kr = row_f32(k + sl[l] * R, rbuf.data(), R);
          for (int64_t h = 0; h < KV; ++h)
            for (int64_t hq = h * G; hq < (h + 1) * G; ++hq)
              scores[hq * L + l] = dot<DC>(qf.data() + hq * D, kr + h * D, D);
        }
        // Softmax numerators, max-subtracted, and their sums.
        for (int64_t hq = 0; hq < H; ++hq) {
          float* s = scores.data() + hq * L;
          float m = s[0];
#pragma omp simd reduction(max : m)
          for (int64_t l = 0; l < n; ++l) m = s[l] > m ? s[l] : m;
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int64_t l = 0; l < n; ++l) {
            s[l] = exp_nonpositive(s[l] - m);
            sum += s[l];
          }
          denom[hq] = sum;
        }
        // Weighted sum of the value rows, each read once, in place.
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t l = 0; l < n; ++l) {
          if (l + PF < n) prefetch_row(v + sl[l + PF] * R, R * sizeof(KT));
          const float* vr = row_f32(v + sl[l] * R, rbuf.data(), R);
          for (int64_t h = 0; h < KV; ++h) {
            const float* vh = vr + h * D;
            for (int64_t hq = h * G; hq < (h + 1) * G; ++hq) {
              const float p = scores[hq * L + l];
              float* a = acc.data() + hq * D;
#pragma omp simd
              for (int64_t d = 0; d < D; ++d) a[d] += p * vh[d];
            }
          }
        }
        for (int64_t hq = 0; hq < H; ++hq)
          store_out(acc.data() + hq * D, 1.0f / denom[hq], op + (b * H + hq) * D * esize, qt, D);
      }
    }
  });
}

template <typename KT>
void decode_head_dim(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& slots, const at::Tensor& ctx_lens, float scale, at::Tensor& out) {
  switch (q.size(2)) {
    case 64: return decode<64, KT>(q, k_cache, v_cache, slots, ctx_lens, scale, out);
    case 128: return decode<128, KT>(q, k_cache, v_cache, slots, ctx_lens, scale, out);
    default: return decode<0, KT>(q, k_cache, v_cache, slots, ctx_lens, scale, out);
  }
}

}  // namespace

at::Tensor paged_decode_attention(at::Tensor q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& slots, const at::Tensor& ctx_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3, "q must be [B, H, D] and the caches [num_slots, KV, D]");
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() &&
                  slots.device().is_cpu() && ctx_lens.device().is_cpu(),
              "the compiled paged_decode_attention runs on CPU tensors only");
  const at::ScalarType qt = q.scalar_type(), kt = k_cache.scalar_type();
  TORCH_CHECK(qt == at::kFloat || qt == at::kBFloat16 || qt == at::kHalf, "q: float32, bfloat16 or float16");
  TORCH_CHECK(kt == at::kFloat || kt == at::kBFloat16 || kt == at::kHalf, "cache: float32, bfloat16 or float16");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && v_cache.scalar_type() == kt && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(),
              "k_cache and v_cache: same shape and dtype, contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KV = k_cache.size(1), num_slots = k_cache.size(0);
  TORCH_CHECK(k_cache.size(2) == D && KV > 0 && H % KV == 0, "head_dim differs, or H is not a multiple of KV");
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == B && slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "slots must be a contiguous int64 [B, L]");
  TORCH_CHECK(ctx_lens.dim() == 1 && ctx_lens.size(0) == B && ctx_lens.scalar_type() == at::kLong &&
                  ctx_lens.is_contiguous(),
              "ctx_lens must be a contiguous int64 [B]");
  if (q.stride(2) != 1) q = q.contiguous();
  const int64_t L = slots.size(1);
  const int64_t* sl = slots.data_ptr<int64_t>();
  const int64_t* lens = ctx_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {  // checked before any thread reads the cache
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= L, "ctx_lens[", b, "] = ", lens[b], " is outside [1, ", L, "]");
    for (int64_t l = 0; l < lens[b]; ++l)
      TORCH_CHECK(sl[b * L + l] >= 0 && sl[b * L + l] < num_slots, "slots[", b, ", ", l, "] is out of range");
  }
  at::Tensor out = at::empty({B, H, D}, q.options());
  const float s = static_cast<float>(scale);
  switch (kt) {
    case at::kBFloat16: decode_head_dim<c10::BFloat16>(q, k_cache, v_cache, slots, ctx_lens, s, out); break;
    case at::kHalf: decode_head_dim<c10::Half>(q, k_cache, v_cache, slots, ctx_lens, s, out); break;
    default: decode_head_dim<float>(q, k_cache, v_cache, slots, ctx_lens, s, out);
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(switchboard, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor ctx_lens, "
        "float scale) -> Tensor", &paged_decode_attention);
}
"""


def paged_decode_attention_ref(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, ctx_lens: Tensor, scale: float
) -> Tensor:
    """Reference for `paged_decode_attention`: gathers each context out of the cache, softmax in float32.

    Semantics:
        G = H // KV  # query heads per kv head
        for b in range(B):
            ctx = slots[b, : ctx_lens[b]]
            for h in range(H):
                k = k_cache[ctx, h // G].float()  # [n, D]
                v = v_cache[ctx, h // G].float()
                p = softmax(scale * (k @ q[b, h].float()))  # [n], max-subtracted, float32
                out[b, h] = (p @ v).to(q.dtype)

    Args:
        q: [B, H, D] one query per sequence (any float dtype).
        k_cache, v_cache: [num_slots, KV, D] the layer's cache (float32, bfloat16 or float16), H a multiple of KV.
        slots: [B, L] int64 cache slot of each context position; any valid slot beyond ctx_lens[b].
        ctx_lens: [B] int64 context length of each sequence, 1 <= ctx_lens[b] <= L.
        scale: softmax scale (head_dim ** -0.5).
    Returns:
        out: [B, H, D] in q's dtype.
    """
    B, L = slots.shape
    H, KV, D = q.shape[1], k_cache.shape[1], q.shape[2]
    k = k_cache.index_select(0, slots.flatten()).view(B, L, KV, D).float()
    v = v_cache.index_select(0, slots.flatten()).view(B, L, KV, D).float()
    qg = q.float().view(B, KV, H // KV, D)
    scores = torch.einsum("bkgd,blkd->bkgl", qg, k) * scale  # [B, KV, G, L]
    past_end = torch.arange(L, device=slots.device)[None, :] >= ctx_lens[:, None]  # [B, L]
    scores = scores.masked_fill(past_end[:, None, None, :], float("-inf"))
    out = torch.einsum("bkgl,blkd->bkgd", scores.softmax(dim=-1), v)
    return out.reshape(B, H, D).to(q.dtype)


def paged_decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, ctx_lens: Tensor, scale: float
) -> Tensor:
    """Decode attention reading the context in place from the paged cache: the compiled kernel on CPU tensors.

    Semantics and arguments: those of `paged_decode_attention_ref`, which runs instead (after one warning) where the
    kernel cannot be built. The kernel computes in float32 whatever the dtypes, and checks shapes, dtypes and that
    every slot in use is in range; it raises on tensors off the CPU.
    """
    return _implementation()(q, k_cache, v_cache, slots, ctx_lens, scale)


def compiled_paged_attention_available() -> bool:
    """Whether the C++ kernel is built and loaded here (compiles it on the first call, about 10 s)."""
    return not isinstance(_built(), str)


def compiled_paged_attention_unavailable_reason() -> str | None:
    """None when the C++ kernel is loaded, else why it cannot be built (builds it on the first call)."""
    built = _built()
    return built if isinstance(built, str) else None


@functools.cache
def _built() -> Callable[..., Tensor] | str:
    reason = build_ops("paged_attention", _SOURCE)
    return reason if reason is not None else torch.ops.switchboard.paged_decode_attention


@functools.cache
def _implementation() -> Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, float], Tensor]:
    built = _built()
    return paged_decode_attention_ref if isinstance(built, str) else built


def _serving_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, mask: Tensor, scale: float) -> Tensor:
    """The torch serving path the kernel replaces: gather the context, upcast to float32, one SDPA call."""
    B, L = slots.shape
    k = k_cache.index_select(0, slots.flatten()).view(B, L, *k_cache.shape[1:]).float()  # [B, L, KV, D]
    v = v_cache.index_select(0, slots.flatten()).view(B, L, *v_cache.shape[1:]).float()
    o = F.scaled_dot_product_attention(
        q.float()[:, :, None],  # [B, H, 1, D]
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,  # [B, 1, 1, L]
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[2],
    )
    return o[:, :, 0].to(q.dtype)


def _best_median_us(fns: dict[str, Callable[[], object]], rounds: int = 3) -> dict[str, float]:
    """Per function, the best over interleaved rounds of the median time of one call (us), each round >= 0.1 s."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(3):
                fn()
            times: list[float] = []
            start = time.perf_counter()
            while time.perf_counter() - start < 0.1 or len(times) < 10:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            best[name] = min(best[name], sorted(times)[len(times) // 2] * 1e6)
    return best


def _time_case(q: Tensor, caches: list[Tensor], slots: Tensor, lens: Tensor, compiled: bool) -> dict[str, float]:
    """Median us per call of each path; call i reads layer cache i mod len(caches), as a decode step does (the
    context is not left in the CPU's caches by the call before)."""
    calls = iter(range(1 << 62))
    mask = (torch.arange(slots.shape[1])[None, :] < lens[:, None])[:, None, None]  # [B, 1, 1, L]
    scale = q.shape[2] ** -0.5

    def layer() -> Tensor:
        return caches[next(calls) % len(caches)]

    fns: dict[str, Callable[[], object]] = {
        "reference": lambda: paged_decode_attention_ref(q, *layer(), slots, lens, scale),
        "serving": lambda: _serving_decode(q, *layer(), slots, mask, scale),
    }
    if compiled:
        fns["compiled"] = lambda: paged_decode_attention(q, *layer(), slots, lens, scale)
    return _best_median_us(fns)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Micro-benchmark of paged decode attention (one call = one layer).")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=8, help="layer caches the calls cycle through")
    p.add_argument("--q-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    B, H, KV, D, bs = args.batch, args.heads, args.kv_heads, args.head_dim, args.block_size
    start = time.perf_counter()
    reason = compiled_paged_attention_unavailable_reason()
    print(f"compiled kernel: {'loaded' if reason is None else 'UNAVAILABLE'} in {time.perf_counter() - start:.1f} s")
    print(
        f"B={B} H={H} KV={KV} D={D} block={bs} q {args.q_dtype}, {args.layers} layer caches cycled, "
        f"{args.threads} threads; median us per call"
    )
    print(f"{'cache':>9} {'L':>4} {'reference':>10} {'serving':>9} {'compiled':>9} {'serving/compiled':>17}")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, D, generator=gen).to(getattr(torch, args.q_dtype))
    for dtype in (torch.float32, torch.bfloat16):
        for L in (64, 96, 128):
            per_seq = -(-L // bs)
            blocks = 2 * B * per_seq  # half the pool in use, the blocks scattered over it
            caches = [torch.randn(2, blocks * bs, KV, D, generator=gen).to(dtype) for _ in range(args.layers)]
            tables = torch.randperm(blocks, generator=gen)[: B * per_seq].view(B, per_seq)
            pos = torch.arange(L)
            slots = tables[:, pos // bs] * bs + pos % bs  # [B, L]
            us = _time_case(q, caches, slots, torch.full((B,), L), compiled=reason is None)
            c = us.get("compiled", float("nan"))
            name = str(dtype).removeprefix("torch.")
            print(
                f"{name:>9} {L:>4} {us['reference']:>10.0f} {us['serving']:>9.0f} {c:>9.0f} {us['serving'] / c:>16.2f}x"
            )


if __name__ == "__main__":
    main()
