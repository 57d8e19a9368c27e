// A bf16 linear on AVX-512 BF16, y = x W^T (+ b), over a weight packed once into tiles of 48 output columns.
// See kernels/cpu_linear.py for why it exists and what it computes; tests/kernels/test_cpu_linear.py for the oracle.
#include "switchboard_cpu.h"

#include <ATen/ops/empty.h>

#include <algorithm>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define SWITCHBOARD_LINEAR_BF16_AVX512 1
#endif

namespace {

constexpr int64_t NV = 3;        // 16-column vectors per tile: a tile is 48 output columns
constexpr int64_t TW = NV * 16;  // a tile's width
constexpr int64_t MR = 8;        // rows per register block: 8 x 3 accumulators, 3 weight vectors, 29 of 32 registers
constexpr int64_t MC = 256;      // rows per pass over the weight: x's rows stay in L2 while every tile streams by

bool bf16_linear_supported() {
#ifdef SWITCHBOARD_LINEAR_BF16_AVX512
  return true;
#else
  return false;
#endif
}

void check_weight(const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kBFloat16 && w.dim() == 2,
              "the weight must be a 2-D bfloat16 CPU tensor");
  TORCH_CHECK(w.size(0) > 0 && w.size(0) % 16 == 0 && w.size(1) > 0 && w.size(1) % 2 == 0, "the weight's shape [",
              w.size(0), ", ", w.size(1),
              "] needs a positive multiple of 16 rows and a positive even number of columns");
}

// The packed weight, flat: tile t (columns [48 t, 48 t + w), w = 48 but for a narrower last tile) holds, for each pair
// of input columns kp, its w output columns' two weights side by side: [tiles][K / 2][w][2]. One VDPBF16PS then
// multiplies 16 output columns by a pair of x's values, and a tile's weights are one forward stream.
at::Tensor pack_bf16_linear(const at::Tensor& weight) {
  check_weight(weight);
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor out = at::empty({N * K}, w.options());
  const uint16_t* s = reinterpret_cast<const uint16_t*>(w.data_ptr());
  uint16_t* d = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, (N + TW - 1) / TW, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * TW, tw = std::min(TW, N - n0);
      uint16_t* tile = d + n0 * K;
      for (int64_t kp = 0; kp < K / 2; ++kp)
        for (int64_t c = 0; c < tw; ++c) {
          tile[(kp * tw + c) * 2] = s[(n0 + c) * K + 2 * kp];
          tile[(kp * tw + c) * 2 + 1] = s[(n0 + c) * K + 2 * kp + 1];
        }
    }
  });
  return out;
}

#ifdef SWITCHBOARD_LINEAR_BF16_AVX512
// gcc 12 warns inside its own AVX-512 intrinsics once inlined (their `_mm256_undefined_*` operands, GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// R rows of x by V vectors of one tile: float32 sums in registers over all of K, then + bias, rounded to bf16 (to
// nearest even, as torch rounds). `pf`: `pf_lines` cache lines of the next tile to fetch meanwhile, `pf_step` per
// pair of K.
template <int R, int V>
inline void block(const uint16_t* x, int64_t ldx, const uint16_t* tile, int64_t tw, int64_t K, const uint16_t* bias,
                  uint16_t* y, int64_t ldy, const char* pf, int64_t pf_lines) {
  const int64_t pf_step = (pf_lines + K / 2 - 1) / (K / 2);
  __m512 acc[R][V];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 3
    for (int j = 0; j < V; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < K / 2; ++kp) {
    for (int64_t l = kp * pf_step; l < std::min((kp + 1) * pf_step, pf_lines); ++l)
      _mm_prefetch(pf + l * 64, _MM_HINT_T0);
    __m512bh wv[V];
#pragma GCC unroll 3
    for (int j = 0; j < V; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(tile + (kp * tw + j * 16) * 2);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      int32_t pair;
      __builtin_memcpy(&pair, x + i * ldx + 2 * kp, sizeof pair);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 3
      for (int j = 0; j < V; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
    }
  }
#pragma GCC unroll 3
  for (int j = 0; j < V; ++j) {
    const __m512 b = bias ? switchboard::bf16x16_to_f32(bias + j * 16) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
      _mm256_storeu_si256((__m256i*)(y + i * ldy + j * 16), (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[i][j], b)));
  }
}

// Any R in [1, MR] and V in [1, NV] to its compiled block.
template <int R>
inline void block_v(int64_t v, const uint16_t* x, int64_t ldx, const uint16_t* tile, int64_t tw, int64_t K,
                    const uint16_t* bias, uint16_t* y, int64_t ldy, const char* pf, int64_t pf_lines) {
  static_assert(NV == 3);
  if (v == 3) return block<R, 3>(x, ldx, tile, tw, K, bias, y, ldy, pf, pf_lines);
  if (v == 2) return block<R, 2>(x, ldx, tile, tw, K, bias, y, ldy, pf, pf_lines);
  return block<R, 1>(x, ldx, tile, tw, K, bias, y, ldy, pf, pf_lines);
}

template <int R = MR>
inline void block_rv(int64_t r, int64_t v, const uint16_t* x, int64_t ldx, const uint16_t* tile, int64_t tw, int64_t K,
                     const uint16_t* bias, uint16_t* y, int64_t ldy, const char* pf, int64_t pf_lines) {
  if constexpr (R > 1) {
    if (r < R) return block_rv<R - 1>(r, v, x, ldx, tile, tw, K, bias, y, ldy, pf, pf_lines);
  }
  block_v<R>(v, x, ldx, tile, tw, K, bias, y, ldy, pf, pf_lines);
}

// Rows [m0, m1) of x by one tile, MR rows at a time; the next tile's bytes are prefetched, spread over the blocks.
void tile_rows(const uint16_t* x, int64_t ldx, int64_t m0, int64_t m1, const uint16_t* tile, int64_t tw, int64_t K,
               const uint16_t* bias, uint16_t* y, int64_t ldy, const char* next, int64_t next_bytes) {
  const int64_t blocks = (m1 - m0 + MR - 1) / MR;
  const int64_t lines = (next_bytes + 63) / 64, per_block = (lines + blocks - 1) / blocks;
  for (int64_t m = m0, b = 0; m < m1; m += MR, ++b) {
    const int64_t pf_lines = std::clamp(lines - b * per_block, int64_t(0), per_block);
    block_rv(std::min(MR, m1 - m), tw / 16, x + m * ldx, ldx, tile, tw, K, bias, y + m * ldy, ldy,
             next + b * per_block * 64, pf_lines);
  }
}

#pragma GCC diagnostic pop
#endif

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                       int64_t out_features) {
  TORCH_CHECK(bf16_linear_supported(), "bf16_linear needs a build with AVX-512 BF16 (-march=native on such a CPU)");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.stride(1) == 1,
              "x must be a 2-D bfloat16 CPU tensor with contiguous rows");
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  TORCH_CHECK(N > 0 && N % 16 == 0 && K > 0 && K % 2 == 0, "out_features ", N, " and in_features ", K,
              " must be a positive multiple of 16 and a positive even number");
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kBFloat16 && packed.dim() == 1 &&
                  packed.is_contiguous() && packed.numel() == N * K,
              "packed must be pack_bf16_linear's output for a [", N, ", ", K, "] weight");
  const uint16_t* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kBFloat16 && bias->dim() == 1 &&
                    bias->is_contiguous() && bias->numel() == N,
                "bias must be a contiguous bfloat16 CPU vector of ", N);
    b = reinterpret_cast<const uint16_t*>(bias->data_ptr());
  }
  at::Tensor y = at::empty({M, N}, x.options());
#ifdef SWITCHBOARD_LINEAR_BF16_AVX512
  if (M == 0) return y;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const int64_t ldx = x.stride(0), tiles = (N + TW - 1) / TW;
  // Each thread takes a run of tiles; a small product (a tiny model's) stays on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, std::min(M, MC) * K * TW));
  for (int64_t m0 = 0; m0 < M; m0 += MC) {
    const int64_t m1 = std::min(M, m0 + MC);
    at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * TW, tw = std::min(TW, N - n0), n1 = n0 + tw;
        const bool more = t + 1 < t1;  // this thread's next tile, fetched while this one computes
        const int64_t next_bytes = more ? std::min(TW, N - n1) * K * 2 : 0;
        tile_rows(xp, ldx, m0, m1, wp + n0 * K, tw, K, b ? b + n0 : nullptr, yp + n0, N,
                  reinterpret_cast<const char*>(wp + n1 * K), next_bytes);
      }
    });
  }
#else
  (void)b;  // unreachable: the check above refused the call
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(switchboard, m) {
  m.def("bf16_linear_supported() -> bool", &bf16_linear_supported);
  m.def("pack_bf16_linear(Tensor weight) -> Tensor", &pack_bf16_linear);
  m.def("bf16_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor", &bf16_linear);
}
