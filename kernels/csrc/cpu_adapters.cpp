// The compiled CPU adapter ops (LoRA on a packed linear, KronA, (IA)3) for the gathered tokens of a step: see
// kernels/cpu_adapters.py for the design, and the torch references each op is tested against.

// GCC 12's AVX-512 intrinsics pass _mm512_undefined_epi32() as an operand they ignore, which -Wmaybe-uninitialized
// reports wherever they are inlined (GCC bug 105593, fixed in GCC 13). The headers (which torch's may include first)
// are read with it silenced, so it stays on for the lines of this file.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "switchboard_cpu.h"

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <vector>

#if defined(__AVX512BW__)
#include <immintrin.h>
#endif
#pragma GCC diagnostic pop

namespace {

constexpr int64_t TB = 8;           // tokens per block: each weight row read from memory serves up to TB tokens
constexpr int64_t V_ = 16;          // floats per vector (one AVX-512 register, two AVX2 ones)
constexpr int64_t PF = 1024;        // bytes ahead of the reads that streamed weights are prefetched
constexpr int64_t CODED_PF = 4096;  // the same for coded slots (measured: 1.75 ms a step at 4-8 KiB, 2.0 at 1 KiB)

// Weights that a call reads once (a slot whose tokens fit one block) are fetched ahead with a non-temporal prefetch
// (prefetchnta), so that streaming every adapter's stacks does not evict the rest of the step's working set (the
// interpreter's objects, activations, the next matmul's operands) from L2 and L3. Hints only: the arithmetic is the
// same. `ahead` walks forward over [ahead, until + distance), 64-byte line by line.
inline void stream_ahead(const char*& ahead, const void* until, int64_t distance = PF) {
  const char* want = static_cast<const char*>(until) + distance;
  for (; ahead < want; ahead += 64) __builtin_prefetch(ahead, 0, 0);
}

// GCC/Clang vector extensions: 16 floats per value, compiled to the widest vectors -march=native offers. Without
// AVX-512, gcc notes that passing a 64-byte vector by value has another ABI; these functions are inlined, internal
// to this file, so no caller across an ABI boundary exists.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float vf __attribute__((vector_size(4 * V_)));
typedef uint32_t vu __attribute__((vector_size(4 * V_)));
typedef uint16_t vh __attribute__((vector_size(2 * V_)));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf load(const c10::BFloat16* p) {  // bf16 is the top half of a float32
  vh h;
  std::memcpy(&h, p, sizeof h);
  const vu u = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
inline vf load(const c10::Half* p) {
  float f[V_];
  for (int64_t i = 0; i < V_; ++i) f[i] = static_cast<float>(p[i]);
  return load(f);
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline void store(c10::BFloat16* p, vf v) {  // round to nearest even, NaN kept a quiet NaN
  vu u;
  std::memcpy(&u, &v, sizeof u);
  const vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const vu nan = (u & 0x7fffffffu) > 0x7f800000u;  // all ones where NaN
  const vh h = __builtin_convertvector((rounded & ~nan) | (0x7fc0u & nan), vh);
  std::memcpy(p, &h, sizeof h);
}
inline void store(c10::Half* p, vf v) {
  float f[V_];
  std::memcpy(f, &v, sizeof f);
  for (int64_t i = 0; i < V_; ++i) p[i] = c10::Half(f[i]);
}

struct Block {
  int64_t slot, begin, end;  // tokens order[begin:end] all use `slot`
  bool once;                 // the slot's only block: its weights are read once in the call, so they are streamed
};

// The tokens with a slot grouped by slot (ascending), in token order within a slot, into `order`; each group cut
// into blocks of up to TB tokens, so that each weight row read from memory serves a block's tokens at once.
std::vector<Block> group_by_slot(const at::Tensor& token_slots, std::vector<int64_t>& order) {
  const int64_t T_ = token_slots.size(0);
  const int64_t* ts = token_slots.data_ptr<int64_t>();
  std::vector<int64_t> used;
  for (int64_t t = 0; t < T_; ++t)
    if (ts[t] >= 0) used.push_back(ts[t]);
  std::sort(used.begin(), used.end());
  used.erase(std::unique(used.begin(), used.end()), used.end());
  std::vector<Block> blocks;
  for (int64_t s : used) {
    const int64_t first = int64_t(order.size());
    for (int64_t t = 0; t < T_; ++t)
      if (ts[t] == s) order.push_back(t);
    const int64_t last = int64_t(order.size());
    for (int64_t b = first; b < last; b += TB) blocks.push_back({s, b, std::min(b + TB, last), last - first <= TB});
  }
  return blocks;
}

// out[i, c0 : c0 + NC * V_] = in[i, :K] @ M[:K, c0 : c0 + NC * V_] for NT rows: NT x NC accumulators stay in
// registers, and each weight row chunk is read once, contiguously, for all NT rows. STREAM: the tile reads whole
// rows of M (c0 = 0, NC * V_ = ld_m), which are streamed (`stream_ahead`).
template <int NT, int NC, bool STREAM, typename T>
inline void tile(const float* in, int64_t ld_in, const T* M, int64_t ld_m, int64_t K, int64_t c0, float* out,
                 int64_t ld_out) {
  vf acc[NT][NC] = {};
  const char* ahead = reinterpret_cast<const char*>(M);
  for (int64_t k = 0; k < K; ++k) {
    if constexpr (STREAM) stream_ahead(ahead, M + (k + 1) * ld_m);
    vf m[NC];
    for (int c = 0; c < NC; ++c) m[c] = load(M + k * ld_m + c0 + c * V_);
    for (int i = 0; i < NT; ++i) {
      const float xv = in[i * ld_in + k];
      for (int c = 0; c < NC; ++c) acc[i][c] += xv * m[c];
    }
  }
  for (int i = 0; i < NT; ++i)
    for (int c = 0; c < NC; ++c) std::memcpy(out + i * ld_out + c0 + c * V_, &acc[i][c], sizeof(vf));
}

template <int NT, bool STREAM, typename T>
inline void tile_nc(int nc, const float* in, int64_t ld_in, const T* M, int64_t ld_m, int64_t K, int64_t c0, float* out,
                    int64_t ld_out) {
  switch (nc) {
    case 1: return tile<NT, 1, STREAM>(in, ld_in, M, ld_m, K, c0, out, ld_out);
    case 2: return tile<NT, 2, STREAM>(in, ld_in, M, ld_m, K, c0, out, ld_out);
    case 3: return tile<NT, 3, STREAM>(in, ld_in, M, ld_m, K, c0, out, ld_out);
    default: return tile<NT, (NT < 8 ? 4 : 3), STREAM>(in, ld_in, M, ld_m, K, c0, out, ld_out);
  }
}

template <bool STREAM, typename T>
inline void tile_nt_nc(int nt, int nc, const float* in, int64_t ld_in, const T* M, int64_t ld_m, int64_t K, int64_t c0,
                       float* out, int64_t ld_out) {
  switch (nt) {
    case 8: return tile_nc<8, STREAM>(nc, in, ld_in, M, ld_m, K, c0, out, ld_out);
    case 4: return tile_nc<4, STREAM>(nc, in, ld_in, M, ld_m, K, c0, out, ld_out);
    case 2: return tile_nc<2, STREAM>(nc, in, ld_in, M, ld_m, K, c0, out, ld_out);
    default: return tile_nc<1, STREAM>(nc, in, ld_in, M, ld_m, K, c0, out, ld_out);
  }
}

// out[i, :N] = in[i, :K] @ M[:K, :N] for i < n (float32 rows in and out, M of the slots' dtype, rows ld_m apart).
// `stream`: M is read once in the call; where one tile covers every row and column (so reads M once, in whole
// rows), M is streamed.
template <typename T>
void rows_matmul(const float* in, int64_t ld_in, int64_t n, const T* M, int64_t ld_m, int64_t K, int64_t N, float* out,
                 int64_t ld_out, bool stream = false) {
  for (int64_t i = 0; i < n;) {
    const int nt = n - i >= 8 ? 8 : n - i >= 4 ? 4 : n - i >= 2 ? 2 : 1;
    const float* in_i = in + i * ld_in;
    float* out_i = out + i * ld_out;
    int64_t c = 0;
    while (c + V_ <= N) {
      const int nc = int(std::min<int64_t>((N - c) / V_, nt == 8 ? 3 : 4));  // at most 24 accumulators
      if (stream && nt == n && nc * V_ == N && ld_m == N)
        tile_nt_nc<true>(nt, nc, in_i, ld_in, M, ld_m, K, c, out_i, ld_out);
      else
        tile_nt_nc<false>(nt, nc, in_i, ld_in, M, ld_m, K, c, out_i, ld_out);
      c += nc * V_;
    }
    for (; c < N; ++c)  // columns past the last full vector
      for (int r = 0; r < nt; ++r) {
        float s = 0.0f;
        for (int64_t k = 0; k < K; ++k) s += in_i[r * ld_in + k] * static_cast<float>(M[k * ld_m + c]);
        out_i[r * ld_out + c] = s;
      }
    i += nt;
  }
}

// rows_matmul reading M row by row, contiguously, with the n output rows (few) accumulated in place in L1;
// `stream`: M is streamed (rows ld_m = N apart).
template <typename T>
void rows_matmul_by_row(const float* in, int64_t ld_in, int64_t n, const T* M, int64_t ld_m, int64_t K, int64_t N,
                        float* out, int64_t ld_out, bool stream) {
  for (int64_t i = 0; i < n; ++i) std::fill(out + i * ld_out, out + i * ld_out + N, 0.0f);
  const int64_t NV = N / V_ * V_;
  const char* ahead = reinterpret_cast<const char*>(M);
  for (int64_t k = 0; k < K; ++k) {
    const T* mr = M + k * ld_m;
    if (stream) stream_ahead(ahead, mr + ld_m);
    for (int64_t c = 0; c < NV; c += V_) {
      const vf m = load(mr + c);
      for (int64_t i = 0; i < n; ++i) store(out + i * ld_out + c, load(out + i * ld_out + c) + in[i * ld_in + k] * m);
    }
    for (int64_t c = NV; c < N; ++c)
      for (int64_t i = 0; i < n; ++i) out[i * ld_out + c] += in[i * ld_in + k] * static_cast<float>(mr[c]);
  }
}

// dst[:n] += src[:n], rounding once into dst's dtype.
template <typename T>
inline void add_into(T* dst, const float* src, int64_t n) {
  int64_t c = 0;
  for (; c + V_ <= n; c += V_) store(dst + c, load(dst + c) + load(src + c));
  for (; c < n; ++c) dst[c] = T(static_cast<float>(dst[c]) + src[c]);
}

// dst[:n] = src[:n] in float32.
template <typename T>
inline void to_float(float* dst, const T* src, int64_t n) {
  int64_t c = 0;
  for (; c + V_ <= n; c += V_) store(dst + c, load(src + c));
  for (; c < n; ++c) dst[c] = static_cast<float>(src[c]);
}

// Coded bf16 slots (kernels/bf16_codec.py has the format's spec; encode_coded_slots below writes it). With 32
// distinct adapters the op is bound by reading their weights from memory; coded, a weight is 12 bits instead of 16:
// its low byte, and a 4-bit code for its high byte (sign and upper exponent bits) through the slot's table of 15 high
// bytes, code 15 taking the slot's next escaped value instead. Decoding is exact, so a coded slot gives the very sums
// of its raw stack. A slot's row of bytes: [0, HEADER) the table, byte CODED being 1 when the slot is coded (else the
// op reads the raw stack); then the escaped values (bf16 bits, in coded order); the row ends with the granules of the
// slot's coded sequence (column tiles of up to 64 columns, each row-major and padded to whole granules), 96 bytes
// each: 32 bytes of codes (byte b holds storage position b in its low nibble and b + 32 in its high one), then 64 low
// bytes.
constexpr int64_t GRANULE = 64, GRANULE_BYTES = 96, HEADER = 16, CODED = 15;

// Where weight p of a granule is stored: p with bit pairs 2-3 and 4-5 swapped, the order in which the AVX-512
// unpacks in Granules::next give the weights back.
inline int64_t storage_position(int64_t p) { return (p & 3) | ((p >> 4) & 3) << 2 | ((p >> 2) & 3) << 4; }

// Granules of a coded [K, N] slot: column tiles of up to 64 columns, each padded to whole granules.
inline int64_t coded_granules(int64_t K, int64_t N) {
  const int64_t full = N / 64, last = N % 64;
  return full * ((K * 64 + GRANULE - 1) / GRANULE) + (K * last + GRANULE - 1) / GRANULE;
}

struct CodedSlot {
  const uint8_t* table = nullptr;  // nullptr: the slot is not coded
  const uint16_t* escapes = nullptr;
  const uint16_t* escapes_end = nullptr;
  const uint8_t* granules = nullptr;
};

// Slot s of a coded stack ([S, L] uint8) of [K, N] slot matrices.
inline CodedSlot coded_slot(const at::Tensor& coded, int64_t s, int64_t K, int64_t N) {
  const int64_t L = coded.size(1);
  const uint8_t* row = coded.data_ptr<uint8_t>() + s * L;
  if (row[CODED] != 1) return {};
  const uint8_t* granules = row + L - GRANULE_BYTES * coded_granules(K, N);
  return {row, reinterpret_cast<const uint16_t*>(row + HEADER), reinterpret_cast<const uint16_t*>(granules), granules};
}

using switchboard::bf16_to_float;

struct Quad {  // a granule's 64 weights, 16q to 16q + 15 in v[q]
  vf v[4];
};

// A granule with escapes (rare), or any granule where there is no AVX-512: weight by weight.
__attribute__((noinline)) Quad decode_slowly(const uint8_t* g, const CodedSlot& s, const uint16_t*& escape) {
  float w[GRANULE];
  for (int64_t p = 0; p < GRANULE; ++p) {
    const int64_t j = storage_position(p);
    const int code = (g[j & 31] >> (j & 32 ? 4 : 0)) & 15;
    uint32_t bits = uint32_t(s.table[code]) << 8 | g[32 + j];
    if (code == 15) bits = escape < s.escapes_end ? *escape++ : 0;
    w[p] = bf16_to_float(bits);
  }
  Quad q;
  for (int i = 0; i < 4; ++i) q.v[i] = load(w + 16 * i);
  return q;
}

// Walks a coded slot's granules in order, streaming them (each is read once in a call).
class Granules {
 public:
  explicit Granules(const CodedSlot& s)
      : s_(s), g_(s.granules), escape_(s.escapes), ahead_(reinterpret_cast<const char*>(s.granules)) {}

  __attribute__((always_inline)) Quad next() {
    const uint8_t* g = g_;
    g_ += GRANULE_BYTES;
    stream_ahead(ahead_, g_, CODED_PF);
#if defined(__AVX512BW__)
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g));
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    const __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(c, nibble)),
                                             _mm256_and_si256(_mm256_srli_epi16(c, 4), nibble), 1);
    if (__builtin_expect(_mm512_cmpeq_epi8_mask(codes, _mm512_set1_epi8(15)) == 0, 1)) {
      const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s_.table)));
      const __m512i hi = _mm512_shuffle_epi8(table, codes);  // per 16-byte lane; the codes are below 16
      const __m512i lo = _mm512_loadu_si512(g + 32);
      const __m512i w0 = _mm512_unpacklo_epi8(lo, hi), w1 = _mm512_unpackhi_epi8(lo, hi);  // bf16 bits
      const __m512i zero = _mm512_setzero_si512();
      static_assert(sizeof(vf) == sizeof(__m512i));
      Quad q;  // bf16 bits << 16 are the float32
      q.v[0] = reinterpret_cast<vf>(_mm512_unpacklo_epi16(zero, w0));
      q.v[1] = reinterpret_cast<vf>(_mm512_unpackhi_epi16(zero, w0));
      q.v[2] = reinterpret_cast<vf>(_mm512_unpacklo_epi16(zero, w1));
      q.v[3] = reinterpret_cast<vf>(_mm512_unpackhi_epi16(zero, w1));
      return q;
    }
#endif
    return decode_slowly(g, s_, escape_);
  }

 private:
  const CodedSlot& s_;
  const uint8_t* g_;
  const uint16_t* escape_;
  const char* ahead_;
};

// Keeps a sum's terms in the order written: the build's -fassociative-math would let gcc regroup the R updates of
// an accumulator that one unit of coded_tile writes out in a row (rows_matmul makes them one per loop iteration), and
// the coded op must give the raw op's sums bit for bit. An empty asm that takes and gives back v, in a register.
inline void in_order(vf& v) {
#if defined(__AVX512F__)
  asm volatile("" : "+v"(v));
#else
  (void)v;
#endif
}

// out[i, :NC * V_] = in[i, :K] @ T for NT rows, T the next column tile of a coded slot ([K, NC * V_], row-major):
// U vectors (whole granules) make R whole rows of T. The sums rows_matmul makes, in the same order.
template <int NT, int NC>
void coded_tile(Granules& granules, const float* in, int64_t ld_in, int64_t K, float* out, int64_t ld_out) {
  constexpr int U = NC == 3 ? 12 : 4, R = U / NC;
  vf acc[NT][NC] = {};
  for (int64_t k = 0; k < K; k += R) {
    vf m[U];  // fully unrolled, so that m and acc stay in registers
#pragma GCC unroll 4
    for (int u = 0; u < U / 4; ++u) {
      const Quad q = granules.next();
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) m[4 * u + j] = q.v[j];
    }
#pragma GCC unroll 4
    for (int j = 0; j < R; ++j)
#pragma GCC unroll 2
      for (int i = 0; i < NT; ++i) {
        const float xv = in[i * ld_in + k + j];
#pragma GCC unroll 4
        for (int c = 0; c < NC; ++c) {
          acc[i][c] += xv * m[j * NC + c];
          in_order(acc[i][c]);
        }
      }
  }
  for (int i = 0; i < NT; ++i)
    for (int c = 0; c < NC; ++c) std::memcpy(out + i * ld_out + c * V_, &acc[i][c], sizeof(vf));
}

constexpr int64_t CODED_TILE = 4 * V_;  // columns of a coded slot's column tiles (bf16_codec.TILE_COLUMNS)

// Whether coded_matmul takes a [K, N] slot for n tokens: 1 or 2 tokens, N whole vectors, and K whole units of the
// last (narrower) tile's coded_tile, so that no tile has padding.
inline bool coded_matmul_takes(int64_t n, int64_t K, int64_t N) {
  const int64_t last = N % CODED_TILE / V_;
  return n <= 2 && N % V_ == 0 && K % (last == 2 ? 2 : last ? 4 : 1) == 0;
}

// out[i, :N] = in[i, :K] @ M for n (1 or 2) rows, M a coded [K, N] slot (bf16_codec: column tiles of up to 64
// columns, left to right, each row-major).
inline void coded_matmul(const CodedSlot& s, int64_t n, const float* in, int64_t ld_in, int64_t K, int64_t N,
                         float* out, int64_t ld_out) {
  Granules granules(s);
  for (int64_t c0 = 0; c0 < N; c0 += CODED_TILE) {
    float* o = out + c0;
    switch (std::min(CODED_TILE, N - c0) / V_ + 4 * (n - 1)) {
      case 1: coded_tile<1, 1>(granules, in, ld_in, K, o, ld_out); break;
      case 2: coded_tile<1, 2>(granules, in, ld_in, K, o, ld_out); break;
      case 3: coded_tile<1, 3>(granules, in, ld_in, K, o, ld_out); break;
      case 4: coded_tile<1, 4>(granules, in, ld_in, K, o, ld_out); break;
      case 5: coded_tile<2, 1>(granules, in, ld_in, K, o, ld_out); break;
      case 6: coded_tile<2, 2>(granules, in, ld_in, K, o, ld_out); break;
      case 7: coded_tile<2, 3>(granules, in, ld_in, K, o, ld_out); break;
      default: coded_tile<2, 4>(granules, in, ld_in, K, o, ld_out);
    }
  }
}

template <typename T>
void apply(at::Tensor& y, const at::Tensor& x, const at::Tensor& token_slots, const at::Tensor& A,
           const std::vector<at::Tensor>& Bs, const std::vector<int64_t>& cols, const std::vector<int64_t>& rows,
           int64_t r, const std::vector<at::Tensor>& coded) {
  const int64_t IN = x.size(1), W = A.size(2), P = int64_t(Bs.size());
  std::vector<int64_t> order;
  const std::vector<Block> blocks = group_by_slot(token_slots, order);
  int64_t max_out = 0;
  for (const auto& B : Bs) max_out = std::max(max_out, B.size(2));
  const T* xp = x.data_ptr<T>();
  const T* ap = A.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const int64_t x_st = x.stride(0), y_st = y.stride(0);
  // Each thread takes a run of blocks and does all their shrinks, then, part by part, all their expands: with the
  // slots in order it streams its A stacks, then each B stack, as one sequence each, which the hardware prefetchers
  // follow across slots (alternating between A and the B's of every slot broke that up). A block's h stays with the
  // thread that computed it.
  at::parallel_for(0, int64_t(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
    // Shrink: h[j] = x[order[j]] @ A[slot] ([in] @ [in, W]) for the run's tokens j, kept in float32.
    const int64_t j0 = blocks[b0].begin;
    std::vector<float> xf(TB * IN), h((blocks[b1 - 1].end - j0) * W), delta(TB * max_out);
    // A slot read once in the call comes from its coded stack where it has one (fewer bytes from memory).
    auto coded_of = [&](int64_t stack, const Block& blk, int64_t K, int64_t N) {
      return blk.once && !coded.empty() ? coded_slot(coded[stack], blk.slot, K, N) : CodedSlot{};
    };
    for (int64_t bi = b0; bi < b1; ++bi) {
      const Block& blk = blocks[bi];
      const int64_t n = blk.end - blk.begin;
      for (int64_t i = 0; i < n; ++i) to_float(xf.data() + i * IN, xp + order[blk.begin + i] * x_st, IN);
      float* hb = h.data() + (blk.begin - j0) * W;
      const CodedSlot cs = coded_matmul_takes(n, IN, W) ? coded_of(0, blk, IN, W) : CodedSlot{};
      if (cs.table)
        coded_matmul(cs, n, xf.data(), IN, IN, W, hb, W);
      else
        rows_matmul(xf.data(), IN, n, ap + blk.slot * IN * W, W, IN, W, hb, W, blk.once);
    }
    // Expand, part by part: y[order[j], cols[p]:] += h[j, rows[p]:rows[p] + r] @ B_p[slot].
    for (int64_t p = 0; p < P; ++p) {
      const int64_t out = Bs[p].size(2);
      const T* bp = Bs[p].data_ptr<T>();
      for (int64_t bi = b0; bi < b1; ++bi) {
        const Block& blk = blocks[bi];
        const int64_t n = blk.end - blk.begin;
        const float* hp = h.data() + (blk.begin - j0) * W + rows[p];
        const T* B = bp + blk.slot * r * out;
        const CodedSlot cs = coded_matmul_takes(n, r, out) ? coded_of(1 + p, blk, r, out) : CodedSlot{};
        if (cs.table)
          coded_matmul(cs, n, hp, W, r, out, delta.data(), out);
        else if (n <= 2)  // few tokens: read B's rows in order (a column tile would jump between its r rows)
          rows_matmul_by_row(hp, W, n, B, out, r, out, delta.data(), out, blk.once);
        else
          rows_matmul(hp, W, n, B, out, r, out, delta.data(), out);
        for (int64_t i = 0; i < n; ++i)
          add_into(yp + order[blk.begin + i] * y_st + cols[p], delta.data() + i * out, out);
      }
    }
  });
}

template <typename T>
void kron_apply_tokens(at::Tensor& y, const at::Tensor& x, const at::Tensor& token_slots, const at::Tensor& W1,
                       const at::Tensor& W2) {
  const int64_t o1 = W1.size(1), i1 = W1.size(2), o2 = W2.size(1), i2 = W2.size(2), IN = i1 * i2;
  std::vector<int64_t> order;
  const std::vector<Block> blocks = group_by_slot(token_slots, order);
  const T* xp = x.data_ptr<T>();
  const T* w1p = W1.data_ptr<T>();
  const T* w2p = W2.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const int64_t x_st = x.stride(0), y_st = y.stride(0);
  at::parallel_for(0, int64_t(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> X(TB * IN), w1(o1 * i1), w2t(i2 * o2), Z(TB * i1 * o2), Y(o1 * o2);
    int64_t loaded = -1;  // the slot whose factors w1 and w2t hold
    for (int64_t bi = b0; bi < b1; ++bi) {
      const Block& blk = blocks[bi];
      const int64_t n = blk.end - blk.begin, s = blk.slot;
      if (s != loaded) {
        to_float(w1.data(), w1p + s * o1 * i1, o1 * i1);
        for (int64_t c = 0; c < o2; ++c)  // W2 transposed, so that both products run along contiguous rows
          for (int64_t b = 0; b < i2; ++b) w2t[b * o2 + c] = static_cast<float>(w2p[(s * o2 + c) * i2 + b]);
        loaded = s;
      }
      for (int64_t i = 0; i < n; ++i) to_float(X.data() + i * IN, xp + order[blk.begin + i] * x_st, IN);
      // Z = X W2^T for every token of the block at once: X as [n * i1, i2] rows, Z as [n * i1, o2].
      rows_matmul(X.data(), i2, n * i1, w2t.data(), o2, i2, o2, Z.data(), o2);
      // Per token, Y = W1 Z ([o1, i1] @ [i1, o2]), added into y's row as Y.flatten().
      for (int64_t i = 0; i < n; ++i) {
        rows_matmul(w1.data(), i1, o1, Z.data() + i * i1 * o2, o2, i1, o2, Y.data(), o2);
        add_into(yp + order[blk.begin + i] * y_st, Y.data(), o1 * o2);
      }
    }
  });
}

template <typename T>
void scale_tokens(at::Tensor& x, const at::Tensor& token_slots, const at::Tensor& V) {
  const int64_t T_ = x.size(0), n = x.size(1);
  const int64_t* ts = token_slots.data_ptr<int64_t>();
  const T* vp = V.data_ptr<T>();
  T* xp = x.data_ptr<T>();
  const int64_t x_st = x.stride(0);
  at::parallel_for(0, T_, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (ts[t] < 0) continue;
      T* row = xp + t * x_st;
      const T* v = vp + ts[t] * n;
      int64_t c = 0;
      for (; c + V_ <= n; c += V_) store(row + c, load(row + c) * load(v + c));
      for (; c < n; ++c) row[c] = T(static_cast<float>(row[c]) * static_cast<float>(v[c]));
    }
  });
}

}  // namespace

// Checks every op makes before a thread reads anything: CPU tensors, a supported dtype shared by `tensors`, and
// token slots that are a contiguous int64 [T] within [-1, num_slots).
at::ScalarType check_dtype(std::initializer_list<const at::Tensor*> tensors, const char* what) {
  const at::ScalarType dt = (*tensors.begin())->scalar_type();
  TORCH_CHECK(switchboard::is_kernel_dtype(dt), what, ": float32, bfloat16 or float16");
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->device().is_cpu(), "the compiled adapter ops run on CPU tensors only");
    TORCH_CHECK(t->scalar_type() == dt, what, ": the tensors must share a dtype");
  }
  return dt;
}

void check_token_slots(const at::Tensor& token_slots, int64_t num_tokens, int64_t num_slots) {
  TORCH_CHECK(token_slots.device().is_cpu() && token_slots.dim() == 1 && token_slots.size(0) == num_tokens &&
                  token_slots.scalar_type() == at::kLong && token_slots.is_contiguous(),
              "token_slots must be a contiguous int64 [T]");
  const int64_t* ts = token_slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tokens; ++t)
    TORCH_CHECK(ts[t] >= -1 && ts[t] < num_slots, "token_slots[", t, "] = ", ts[t], " is out of range");
}

void scale_gather(at::Tensor x, const at::Tensor& token_slots, const at::Tensor& V) {
  const at::ScalarType dt = check_dtype({&x, &V}, "x and V");
  TORCH_CHECK(V.dim() == 2 && V.is_contiguous(), "V must be a contiguous [S, n]");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) == V.size(1), "x must be [T, n] with contiguous rows");
  check_token_slots(token_slots, x.size(0), V.size(0));
  switch (dt) {
    case at::kBFloat16: scale_tokens<c10::BFloat16>(x, token_slots, V); break;
    case at::kHalf: scale_tokens<c10::Half>(x, token_slots, V); break;
    default: scale_tokens<float>(x, token_slots, V);
  }
}

void lora_packed_gather(at::Tensor y, const at::Tensor& x, const at::Tensor& token_slots, const at::Tensor& A,
                        at::TensorList Bs, at::IntArrayRef cols, at::IntArrayRef rows, int64_t r,
                        at::TensorList coded) {
  const at::ScalarType dt = check_dtype({&x, &y, &A}, "x, y and A");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && y.size(0) == x.size(0), "x [T, in] and y [T, out] expected");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1, "x and y rows must be contiguous");
  TORCH_CHECK(A.dim() == 3 && A.is_contiguous() && A.size(1) == x.size(1), "A must be a contiguous [S, in, W]");
  check_token_slots(token_slots, x.size(0), A.size(0));
  TORCH_CHECK(Bs.size() == cols.size() && Bs.size() == rows.size(), "one column and one h row offset per part");
  const int64_t S = A.size(0), W = A.size(2);
  std::vector<at::Tensor> parts;
  for (size_t p = 0; p < Bs.size(); ++p) {
    const at::Tensor& B = Bs[p];
    TORCH_CHECK(B.device().is_cpu() && B.dim() == 3 && B.is_contiguous() && B.size(0) == S && B.size(1) == r &&
                    B.scalar_type() == dt,
                "each B must be a contiguous CPU [S, r, out] of x's dtype");
    TORCH_CHECK(rows[p] >= 0 && rows[p] + r <= W, "part ", p, ": h rows out of range");
    TORCH_CHECK(cols[p] >= 0 && cols[p] + B.size(2) <= y.size(1), "part ", p, ": columns out of range");
    parts.push_back(B);
  }
  std::vector<at::Tensor> coded_stacks;
  if (!coded.empty()) {  // A's coded stack, then each B's
    TORCH_CHECK(dt == at::kBFloat16, "coded stacks are bfloat16 slots");
    TORCH_CHECK(coded.size() == 1 + Bs.size(), "one coded stack for A and one per B");
    for (size_t i = 0; i < coded.size(); ++i) {
      const at::Tensor& C = coded[i];
      const int64_t K = i == 0 ? x.size(1) : r, N = i == 0 ? W : Bs[i - 1].size(2);
      TORCH_CHECK(C.device().is_cpu() && C.scalar_type() == at::kByte && C.dim() == 2 && C.is_contiguous() &&
                      C.size(0) == S && C.size(1) >= HEADER + GRANULE_BYTES * coded_granules(K, N),
                  "coded stack ", i, " must be a contiguous uint8 [S, L] with room for [", K, ", ", N, "] slots");
      coded_stacks.push_back(C);
    }
  }
  const std::vector<int64_t> c(cols.begin(), cols.end()), rw(rows.begin(), rows.end());
  switch (dt) {
    case at::kBFloat16: apply<c10::BFloat16>(y, x, token_slots, A, parts, c, rw, r, coded_stacks); break;
    case at::kHalf: apply<c10::Half>(y, x, token_slots, A, parts, c, rw, r, coded_stacks); break;
    default: apply<float>(y, x, token_slots, A, parts, c, rw, r, coded_stacks);
  }
}

void kron_gather(at::Tensor y, const at::Tensor& x, const at::Tensor& token_slots, const at::Tensor& W1,
                 const at::Tensor& W2) {
  const at::ScalarType dt = check_dtype({&x, &y, &W1, &W2}, "x, y, W1 and W2");
  TORCH_CHECK(W1.dim() == 3 && W2.dim() == 3 && W1.is_contiguous() && W2.is_contiguous() && W1.size(0) == W2.size(0),
              "W1 [S, o1, i1] and W2 [S, o2, i2] must be contiguous");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && y.size(0) == x.size(0) && x.stride(1) == 1 && y.stride(1) == 1,
              "x [T, in] and y [T, out] with contiguous rows expected");
  TORCH_CHECK(x.size(1) == W1.size(2) * W2.size(2) && y.size(1) == W1.size(1) * W2.size(1),
              "x must have i1 * i2 columns and y o1 * o2");
  check_token_slots(token_slots, x.size(0), W1.size(0));
  switch (dt) {
    case at::kBFloat16: kron_apply_tokens<c10::BFloat16>(y, x, token_slots, W1, W2); break;
    case at::kHalf: kron_apply_tokens<c10::Half>(y, x, token_slots, W1, W2); break;
    default: kron_apply_tokens<float>(y, x, token_slots, W1, W2);
  }
}

// Codes each [K, N] slot of bf16 `weights` ([S, K, N]) into its row of `rows` ([S, L] uint8) in the layout above
// (bf16_codec.py is the spec: its decode_slot reads these rows back). A slot with more escapes than its row has room
// for is marked not coded (byte CODED is 0), and the op reads its raw stack.
void encode_coded_slots(const at::Tensor& weights, at::Tensor rows) {
  TORCH_CHECK(weights.device().is_cpu() && weights.scalar_type() == at::kBFloat16 && weights.dim() == 3 &&
                  weights.is_contiguous(),
              "weights must be a contiguous bf16 CPU [S, K, N]");
  const int64_t S = weights.size(0), K = weights.size(1), N = weights.size(2), L = rows.size(1);
  const int64_t G = coded_granules(K, N), room = (L - HEADER - GRANULE_BYTES * G) / 2;
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == at::kByte && rows.dim() == 2 && rows.is_contiguous() &&
                  rows.size(0) == S && room >= 0,
              "rows must be a contiguous uint8 CPU [S, L] with room for [", K, ", ", N, "] slots");
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(weights.data_ptr<c10::BFloat16>());
  uint8_t* rp = rows.data_ptr<uint8_t>();
  at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const uint16_t* w = wp + s * K * N;
      uint8_t* row = rp + s * L;
      std::fill(row, row + L, uint8_t(0));
      int64_t count[256] = {};
      for (int64_t i = 0; i < K * N; ++i) ++count[w[i] >> 8];
      int order[256];
      for (int b = 0; b < 256; ++b) order[b] = b;
      std::stable_sort(order, order + 256, [&](int a, int b) { return count[a] > count[b]; });
      int code_of[256];
      std::fill(code_of, code_of + 256, 15);
      int64_t escapes = K * N;
      for (int c = 0; c < 15; ++c) code_of[order[c]] = c, escapes -= count[order[c]];
      if (escapes > room) continue;  // not coded: byte CODED stays 0
      for (int c = 0; c < 15; ++c) row[c] = uint8_t(order[c]);
      row[CODED] = 1;
      uint16_t* escape = reinterpret_cast<uint16_t*>(row + HEADER);
      uint8_t* g = row + L - GRANULE_BYTES * G;  // the granule being written, p its next place
      int64_t p = 0;
      // The coded sequence: column tiles of up to 64 columns, each row-major and padded to whole granules.
      for (int64_t c0 = 0; c0 < N; c0 += 64) {
        const int64_t c1 = std::min(N, c0 + 64);
        for (int64_t k = 0; k < K; ++k)
          for (int64_t c = c0; c < c1; ++c) {
            const uint16_t v = w[k * N + c];
            const int code = code_of[v >> 8];
            if (code == 15) *escape++ = v;
            const int64_t j = storage_position(p);
            g[j & 31] |= uint8_t(code << (j & 32 ? 4 : 0));
            g[32 + j] = uint8_t(v & 0xff);
            if (++p == GRANULE) p = 0, g += GRANULE_BYTES;
          }
        if (p) p = 0, g += GRANULE_BYTES;
      }
    }
  });
}

bool coded_decode_vectorized() {
#if defined(__AVX512BW__)
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY_FRAGMENT(switchboard, m) {
  m.def("coded_decode_vectorized() -> bool", &coded_decode_vectorized);
  m.def("encode_coded_slots(Tensor weights, Tensor(a!) rows) -> ()", &encode_coded_slots);
  m.def(
      "lora_packed_gather(Tensor(a!) y, Tensor x, Tensor token_slots, Tensor A, Tensor[] Bs, int[] cols, "
      "int[] rows, int r, Tensor[] coded) -> ()",
      &lora_packed_gather);
  m.def("scale_gather(Tensor(a!) x, Tensor token_slots, Tensor V) -> ()", &scale_gather);
  m.def("kron_gather(Tensor(a!) y, Tensor x, Tensor token_slots, Tensor W1, Tensor W2) -> ()", &kron_gather);
}
