// Paged decode attention on the CPU: each sequence's one query attends to its context, read in place from the
// cache. See kernels/paged_attention.py for the design, and paged_decode_attention_ref for the semantics.
#include "switchboard_cpu.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

// One cache row as float32: float32 rows are read in place, bf16 and fp16 rows converted into `buf`.
inline const float* row_f32(const float* src, float*, int64_t) { return src; }

inline const float* row_f32(const c10::BFloat16* src, float* buf, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) buf[i] = switchboard::bf16_to_float(s[i]);
  return buf;
}

inline const float* row_f32(const c10::Half* src, float* buf, int64_t n) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
  return buf;
}

using switchboard::exp_f32;
using switchboard::prefetch_lines;

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

// Each head's scores (rows of `scores`, L apart, the first n in use) become their softmax numerators, max-subtracted;
// their sums go to `denom`.
inline void softmax_rows(float* scores, float* denom, int64_t H, int64_t L, int64_t n) {
  for (int64_t hq = 0; hq < H; ++hq) {
    float* s = scores + hq * L;
    float m = s[0];
#pragma omp simd reduction(max : m)
    for (int64_t l = 0; l < n; ++l) m = s[l] > m ? s[l] : m;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t l = 0; l < n; ++l) {
      s[l] = exp_f32(s[l] - m);
      sum += s[l];
    }
    denom[hq] = sum;
  }
}

template <int64_t DC, typename KT>
void decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
            const at::Tensor& ctx_lens, const int64_t* seq_of, float scale, at::Tensor& out) {
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
        const int64_t* sl = all_slots + (seq_of != nullptr ? seq_of[b] : b) * L;
        for (int64_t hq = 0; hq < H; ++hq) load_q(qp + b * q_sb + hq * q_sh, qt, scale, qf.data() + hq * D, D);
        // Scores: each key row is read once, in place, for the G query heads that share it.
        for (int64_t l = 0; l < n; ++l) {
          if (l + PF < n) prefetch_lines(k + sl[l + PF] * R, R * sizeof(KT));
          const float* kr = row_f32(k + sl[l] * R, rbuf.data(), R);
          for (int64_t h = 0; h < KV; ++h)
            for (int64_t hq = h * G; hq < (h + 1) * G; ++hq)
              scores[hq * L + l] = dot<DC>(qf.data() + hq * D, kr + h * D, D);
        }
        softmax_rows(scores.data(), denom.data(), H, L, n);
        // Weighted sum of the value rows, each read once, in place.
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t l = 0; l < n; ++l) {
          if (l + PF < n) prefetch_lines(v + sl[l + PF] * R, R * sizeof(KT));
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

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define SWITCHBOARD_DECODE_BF16_AVX512 1
// gcc 12 warns inside its own AVX-512 intrinsics once inlined (their `_mm256_undefined_*` operands, GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

using switchboard::bf16x16_to_f32;

// A bf16 query against a bf16 cache, head size D (a multiple of 32), on AVX-512 BF16: what a bf16 model decodes with.
// `decode` spends most of its time in one float32 dot product per (key row, query head), a chain of dependent FMAs
// and a horizontal sum each. Here a score is two or four VDPBF16PS (pairs of bf16 multiplied exactly, summed in
// float32) on the query and key as they are stored, and the scale is applied to the score (q * scale is not a bf16
// value in general). The weighted sum of the values keeps up to 16 vectors of accumulators in registers for a group
// of query heads over every row, instead of reloading and storing them per row. The same arithmetic as `decode` up to
// the order of float32 additions.
template <int64_t D>
void decode_bf16(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                 const at::Tensor& ctx_lens, const int64_t* seq_of, float scale, at::Tensor& out) {
  constexpr int64_t C = D / 32;   // vectors of 32 bf16 per head row
  constexpr int64_t F = D / 16;   // vectors of 16 float32 per head row
  constexpr int64_t GC = 16 / F;  // query heads whose value sums fit in 16 registers at once
  const int64_t B = q.size(0), H = q.size(1), KV = k_cache.size(1), L = slots.size(1);
  const int64_t G = H / KV, R = KV * D;
  const int64_t q_sb = q.stride(0), q_sh = q.stride(1);
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const uint16_t* k = reinterpret_cast<const uint16_t*>(k_cache.data_ptr());
  const uint16_t* v = reinterpret_cast<const uint16_t*>(v_cache.data_ptr());
  const int64_t* all_slots = slots.data_ptr<int64_t>();
  const int64_t* lens = ctx_lens.data_ptr<int64_t>();
  char* op = static_cast<char*>(out.data_ptr());
  constexpr int64_t PF = 8;  // rows ahead: a row takes a few dozen cycles here, an L3 miss hundreds
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> scores(H * L), denom(H), acc(H * D);
    for (int64_t w = w0; w < w1; ++w) {
      for (int64_t b = next.fetch_add(1); b < B; b = next.fetch_add(1)) {
        const int64_t n = lens[b];
        const int64_t* sl = all_slots + (seq_of != nullptr ? seq_of[b] : b) * L;
        const uint16_t* qb = qp + b * q_sb;  // the query's rows stay in L1: loaded again for each key row
        for (int64_t l = 0; l < n; ++l) {
          if (l + PF < n) prefetch_lines(k + sl[l + PF] * R, R * 2);
          const uint16_t* kr = k + sl[l] * R;
          for (int64_t h = 0; h < KV; ++h) {
            __m512bh kv[C];
            for (int64_t c = 0; c < C; ++c) kv[c] = (__m512bh)_mm512_loadu_si512(kr + h * D + c * 32);
            for (int64_t hq = h * G; hq < (h + 1) * G; ++hq) {
              __m512 s = _mm512_setzero_ps();
              for (int64_t c = 0; c < C; ++c)
                s = _mm512_dpbf16_ps(s, (__m512bh)_mm512_loadu_si512(qb + hq * q_sh + c * 32), kv[c]);
              scores[hq * L + l] = _mm512_reduce_add_ps(s) * scale;
            }
          }
        }
        softmax_rows(scores.data(), denom.data(), H, L, n);
        for (int64_t h = 0; h < KV; ++h) {
          for (int64_t h0 = h * G; h0 < (h + 1) * G; h0 += GC) {
            const int64_t gn = std::min(GC, (h + 1) * G - h0);
            __m512 a[GC][F];
            for (int64_t g = 0; g < GC; ++g)
              for (int64_t f = 0; f < F; ++f) a[g][f] = _mm512_setzero_ps();
            for (int64_t l = 0; l < n; ++l) {
              if (l + PF < n) prefetch_lines(v + sl[l + PF] * R + h * D, D * 2);
              const uint16_t* vr = v + sl[l] * R + h * D;
              __m512 vf[F];
              for (int64_t f = 0; f < F; ++f) vf[f] = bf16x16_to_f32(vr + f * 16);
              for (int64_t g = 0; g < gn; ++g) {
                const __m512 p = _mm512_set1_ps(scores[(h0 + g) * L + l]);
                for (int64_t f = 0; f < F; ++f) a[g][f] = _mm512_fmadd_ps(p, vf[f], a[g][f]);
              }
            }
            for (int64_t g = 0; g < gn; ++g)
              for (int64_t f = 0; f < F; ++f) _mm512_storeu_ps(acc.data() + (h0 + g) * D + f * 16, a[g][f]);
          }
        }
        for (int64_t hq = 0; hq < H; ++hq)
          store_out(acc.data() + hq * D, 1.0f / denom[hq], op + (b * H + hq) * D * 2, at::kBFloat16, D);
      }
    }
  });
}
#pragma GCC diagnostic pop
#endif

template <typename KT>
void decode_head_dim(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                     const at::Tensor& ctx_lens, const int64_t* seq_of, float scale, at::Tensor& out) {
#ifdef SWITCHBOARD_DECODE_BF16_AVX512
  if constexpr (std::is_same_v<KT, c10::BFloat16>) {
    if (q.scalar_type() == at::kBFloat16 && q.stride(2) == 1) {
      switch (q.size(2)) {
        case 64: return decode_bf16<64>(q, k_cache, v_cache, slots, ctx_lens, seq_of, scale, out);
        case 128: return decode_bf16<128>(q, k_cache, v_cache, slots, ctx_lens, seq_of, scale, out);
        default: break;
      }
    }
  }
#endif
  switch (q.size(2)) {
    case 64: return decode<64, KT>(q, k_cache, v_cache, slots, ctx_lens, seq_of, scale, out);
    case 128: return decode<128, KT>(q, k_cache, v_cache, slots, ctx_lens, seq_of, scale, out);
    default: return decode<0, KT>(q, k_cache, v_cache, slots, ctx_lens, seq_of, scale, out);
  }
}

}  // namespace

namespace {

// Each query b attends to the first ctx_lens[b] slots of its row of `slots`: row b for a decode (one query per
// sequence), row seq_of[b] for a prefill's queries (several per sequence, each its own causal length).
at::Tensor attend(at::Tensor q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                  const at::Tensor& ctx_lens, const at::Tensor* seq_of, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3, "q must be [B, H, D] and the caches [num_slots, KV, D]");
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() &&
                  slots.device().is_cpu() && ctx_lens.device().is_cpu(),
              "the compiled paged attention runs on CPU tensors only");
  const at::ScalarType qt = q.scalar_type(), kt = k_cache.scalar_type();
  TORCH_CHECK(switchboard::is_kernel_dtype(qt), "q: float32, bfloat16 or float16");
  TORCH_CHECK(switchboard::is_kernel_dtype(kt), "cache: float32, bfloat16 or float16");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && v_cache.scalar_type() == kt && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(),
              "k_cache and v_cache: same shape and dtype, contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KV = k_cache.size(1), num_slots = k_cache.size(0);
  const int64_t rows = seq_of != nullptr ? slots.size(0) : B;
  TORCH_CHECK(k_cache.size(2) == D && KV > 0 && H % KV == 0, "head_dim differs, or H is not a multiple of KV");
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == rows && slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "slots must be a contiguous int64 [rows, L]");
  TORCH_CHECK(
      ctx_lens.dim() == 1 && ctx_lens.size(0) == B && ctx_lens.scalar_type() == at::kLong && ctx_lens.is_contiguous(),
      "ctx_lens must be a contiguous int64 [B]");
  if (q.stride(2) != 1) q = q.contiguous();
  const int64_t L = slots.size(1);
  const int64_t* sl = slots.data_ptr<int64_t>();
  const int64_t* lens = ctx_lens.data_ptr<int64_t>();
  const int64_t* of = nullptr;
  if (seq_of != nullptr) {
    TORCH_CHECK(seq_of->dim() == 1 && seq_of->size(0) == B && seq_of->scalar_type() == at::kLong &&
                    seq_of->is_contiguous() && seq_of->device().is_cpu(),
                "seq_of must be a contiguous int64 [B] on the CPU");
    of = seq_of->data_ptr<int64_t>();
  }
  // Checked before any thread reads the cache: each row's slots up to the longest context that reads it.
  std::vector<int64_t> used(rows, 0);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= L, "ctx_lens[", b, "] = ", lens[b], " is outside [1, ", L, "]");
    const int64_t r = of != nullptr ? of[b] : b;
    TORCH_CHECK(r >= 0 && r < rows, "seq_of[", b, "] = ", r, " is not a row of slots");
    used[r] = std::max(used[r], lens[b]);
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t l = 0; l < used[r]; ++l)
      TORCH_CHECK(sl[r * L + l] >= 0 && sl[r * L + l] < num_slots, "slots[", r, ", ", l, "] is out of range");
  at::Tensor out = at::empty({B, H, D}, q.options());
  const float s = static_cast<float>(scale);
  switch (kt) {
    case at::kBFloat16: decode_head_dim<c10::BFloat16>(q, k_cache, v_cache, slots, ctx_lens, of, s, out); break;
    case at::kHalf: decode_head_dim<c10::Half>(q, k_cache, v_cache, slots, ctx_lens, of, s, out); break;
    default: decode_head_dim<float>(q, k_cache, v_cache, slots, ctx_lens, of, s, out);
  }
  return out;
}

}  // namespace

at::Tensor paged_decode_attention(at::Tensor q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& slots, const at::Tensor& ctx_lens, double scale) {
  return attend(std::move(q), k_cache, v_cache, slots, ctx_lens, nullptr, scale);
}

// A prefill chunk's queries, each attending to its sequence's cache up to its own position (causal): the decode
// kernel, with one query per row of q and its sequence's row of `slots` (seq_of).
at::Tensor paged_prefill_attention(at::Tensor q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& slots, const at::Tensor& ctx_lens, const at::Tensor& seq_of,
                                   double scale) {
  return attend(std::move(q), k_cache, v_cache, slots, ctx_lens, &seq_of, scale);
}

TORCH_LIBRARY_FRAGMENT(switchboard, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor ctx_lens, "
      "float scale) -> Tensor",
      &paged_decode_attention);
  m.def(
      "paged_prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor ctx_lens, "
      "Tensor seq_of, float scale) -> Tensor",
      &paged_prefill_attention);
}
