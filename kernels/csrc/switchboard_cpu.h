// What the CPU kernels share: torch's headers they all need, and the bit-level helpers each would otherwise write
// again. Included by the .cpp files beside it; kernels/cpp_build.py copies it next to each build's source.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <bit>
#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace switchboard {

// The float32 whose top half is the bfloat16 in the low 16 bits of `bits` (bfloat16 is float32 cut short).
inline float bf16_to_float(uint32_t bits) { return std::bit_cast<float>(bits << 16); }

// exp(x) in plain arithmetic that gcc vectorises: 2^n * exp(r) with |r| <= ln(2) / 2 and Cephes' expf polynomial
// (relative error about 2e-7); 0 below -87.3, +inf above 88.3 (float32 itself overflows past 88.72), NaN kept.
inline float exp_f32(float x) {
  const float xc = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float two_n = std::bit_cast<float>(uint32_t(int32_t(n) + 127) << 23);
  const float e = p * two_n;
  return x < -87.3f ? 0.0f : (x > 88.3f ? INFINITY : (x == x ? e : x));
}

// Fetch [p, p + bytes) into every cache level, one 64-byte line after another (a hint: nothing changes but time).
inline void prefetch_lines(const void* p, int64_t bytes) {
  for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch(static_cast<const char*>(p) + c);
}

#if defined(__AVX512F__)
// 16 bf16 values -> 16 float32 in a register (bf16 is float32 cut short: widen, shift into the top half).
inline __m512 bf16x16_to_f32(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
#endif

// The dtypes every kernel takes: float32, bfloat16 and float16 (each computes in float32).
inline bool is_kernel_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

}  // namespace switchboard
