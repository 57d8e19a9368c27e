// The element-wise work of a bf16 Llama decoder step on the CPU, each in one call: RMSNorm with the residual add,
// SiLU(gate) * up, RoPE on q and k in place, and the greedy argmax of float32 logits. See kernels/cpu_step.py for the
// design and for the torch functions each op equals (its spec and test oracle).
#include "switchboard_cpu.h"

#include <ATen/ops/empty.h>

#include <cmath>

namespace {

using switchboard::bf16_to_float;
using switchboard::exp_f32;

// float32 -> bfloat16 bits, rounded to nearest even as torch converts (a NaN stays a quiet NaN).
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return uint16_t((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded);
}

// What torch computes for one bf16 element-wise op: the float32 result rounded to bf16.
inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

const uint16_t* bf16_data(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }
uint16_t* bf16_data_mut(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); }

// Rows [begin, end) of a [T, n] problem on torch's threads; few elements stay on the calling thread.
template <typename F>
void for_rows(int64_t rows, int64_t row_elems, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_elems));
  at::parallel_for(0, rows, grain, f);
}

void check_rows(const at::Tensor& t, const char* name, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == 2 && t.stride(1) == 1, name,
              " must be a 2-D bfloat16 CPU tensor with contiguous rows");
  TORCH_CHECK(cols < 0 || t.size(1) == cols, name, " has ", t.size(1), " columns, expected ", cols);
}

void check_weight(const at::Tensor& w, int64_t n) {
  TORCH_CHECK(
      w.device().is_cpu() && w.scalar_type() == at::kBFloat16 && w.dim() == 1 && w.is_contiguous() && w.size(0) == n,
      "weight must be a contiguous bfloat16 CPU vector of ", n);
}

// out = weight * bf16(h * rsqrt(mean(h^2) + eps)), h = x in float32: RMSNorm as transformers computes it.
inline void norm_row(const uint16_t* x, const uint16_t* w, uint16_t* out, int64_t n, float eps) {
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) {
    const float h = bf16_to_float(x[i]);
    ss += h * h;
  }
  const float r = 1.0f / std::sqrt(ss / float(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = float_to_bf16(bf16_to_float(w[i]) * round_bf16(bf16_to_float(x[i]) * r));
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x", -1);
  const int64_t T = x.size(0), n = x.size(1), xs = x.stride(0);
  check_weight(weight, n);
  at::Tensor out = at::empty({T, n}, x.options());
  const uint16_t *xp = bf16_data(x), *wp = bf16_data(weight);
  uint16_t* op = bf16_data_mut(out);
  for_rows(T, n, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) norm_row(xp + t * xs, wp, op + t * n, n, float(eps));
  });
  return out;
}

// residual = bf16(residual + x), in place; returns RMSNorm(residual).
at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_rows(residual, "residual", -1);
  const int64_t T = residual.size(0), n = residual.size(1), rs = residual.stride(0);
  check_rows(x, "x", n);
  TORCH_CHECK(x.size(0) == T, "x has ", x.size(0), " rows, residual ", T);
  check_weight(weight, n);
  const int64_t xs = x.stride(0);
  at::Tensor out = at::empty({T, n}, residual.options());
  const uint16_t *xp = bf16_data(x), *wp = bf16_data(weight);
  uint16_t *rp = bf16_data_mut(residual), *op = bf16_data_mut(out);
  for_rows(T, n, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      uint16_t* r = rp + t * rs;
      const uint16_t* xr = xp + t * xs;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) r[i] = float_to_bf16(bf16_to_float(r[i]) + bf16_to_float(xr[i]));
      norm_row(r, wp, op + t * n, n, float(eps));
    }
  });
  return out;
}

// gate_up: [T, 2 * I], gate | up -> bf16(bf16(silu(gate)) * up): [T, I].
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up", -1);
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even number of columns");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2, gs = gate_up.stride(0);
  at::Tensor out = at::empty({T, I}, gate_up.options());
  const uint16_t* gp = bf16_data(gate_up);
  uint16_t* op = bf16_data_mut(out);
  for_rows(T, I, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const uint16_t *g = gp + t * gs, *u = g + I;
      uint16_t* o = op + t * I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) {
        const float x = bf16_to_float(g[i]);
        o[i] = float_to_bf16(round_bf16(x / (1.0f + exp_f32(-x))) * bf16_to_float(u[i]));
      }
    }
  });
  return out;
}

// Rotate-half RoPE on the first `heads` heads of each row of qkv, in place; cos, sin: [T, D] bf16. Each product and
// the sum round to bf16, as torch's `x * cos + rotate_half(x) * sin` does in bf16.
void rope_(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t heads, int64_t head_dim) {
  check_rows(qkv, "qkv", -1);
  const int64_t T = qkv.size(0), D = head_dim, half = D / 2, qs = qkv.stride(0);
  TORCH_CHECK(D % 2 == 0 && heads * D <= qkv.size(1), "qkv has no ", heads, " heads of ", D);
  check_rows(cos, "cos", D);
  check_rows(sin, "sin", D);
  TORCH_CHECK(cos.size(0) == T && sin.size(0) == T, "cos and sin need a row per token");
  const uint16_t *cp = bf16_data(cos), *sp = bf16_data(sin);
  const int64_t cs = cos.stride(0), ss = sin.stride(0);
  uint16_t* xp = bf16_data_mut(qkv);
  for_rows(T, heads * D, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const uint16_t *c = cp + t * cs, *s = sp + t * ss;
      for (int64_t h = 0; h < heads; ++h) {
        uint16_t* x = xp + t * qs + h * D;
#pragma omp simd
        for (int64_t d = 0; d < half; ++d) {
          const float x1 = bf16_to_float(x[d]), x2 = bf16_to_float(x[d + half]);
          const float lo = round_bf16(x1 * bf16_to_float(c[d])) + round_bf16(-x2 * bf16_to_float(s[d]));
          const float hi = round_bf16(x2 * bf16_to_float(c[d + half])) + round_bf16(x1 * bf16_to_float(s[d + half]));
          x[d] = float_to_bf16(lo);
          x[d + half] = float_to_bf16(hi);
        }
      }
    }
  });
}

// The first index of each row's maximum, for rows of finite float32 logits: [N, V] -> int64 [N].
at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(
      logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.stride(1) == 1,
      "logits must be a 2-D float32 CPU tensor with contiguous rows");
  const int64_t N = logits.size(0), V = logits.size(1), ls = logits.stride(0);
  at::Tensor out = at::empty({N}, logits.options().dtype(at::kLong));
  const float* lp = logits.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = lp + r * ls;
      float m = row[0];
#pragma omp simd reduction(max : m)
      for (int64_t v = 0; v < V; ++v) m = row[v] > m ? row[v] : m;
      int64_t first = 0;  // a row with a NaN (never passed: the sampler drops such rows first) answers 0
      for (int64_t v = 0; v < V; ++v) {
        if (row[v] == m) {
          first = v;
          break;
        }
      }
      op[r] = first;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(switchboard, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("add_rms_norm(Tensor x, Tensor(a!) residual, Tensor weight, float eps) -> Tensor", &add_rms_norm);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
  m.def("rope_(Tensor(a!) qkv, Tensor cos, Tensor sin, int heads, int head_dim) -> ()", &rope_);
  m.def("argmax_rows(Tensor logits) -> Tensor", &argmax_rows);
}
