// What the CPU kernels share: torch's headers they all need, and the bit-level helpers each would otherwise write
// again. Included by the .cpp files beside it; kernels/cpp_build.py copies it next to each build's source.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <bit>
#include <cstdint>

namespace switchboard {

// The float32 whose top half is the bfloat16 in the low 16 bits of `bits` (bfloat16 is float32 cut short).
inline float bf16_to_float(uint32_t bits) { return std::bit_cast<float>(bits << 16); }

// Fetch [p, p + bytes) into every cache level, one 64-byte line after another (a hint: nothing changes but time).
inline void prefetch_lines(const void* p, int64_t bytes) {
  for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch(static_cast<const char*>(p) + c);
}

// The dtypes every kernel takes: float32, bfloat16 and float16 (each computes in float32).
inline bool is_kernel_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

}  // namespace switchboard
