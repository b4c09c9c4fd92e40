// lrq's CPU kernel library for onnxruntime: ai.lrq.cpu::MatMulInt4, a block-quantized 4-bit
// weight GEMM with MatMulNBits' numerics (fp32 activations at accuracy level 1, int8 ones at 4).
//
//   Y[m, n] = sum_k A[m, k] * scale[n, k / block] * (code[n, k] - zero[n, k / block])  (+ bias[n])
//
// Inputs, as MatMulNBits takes them: A float [..., K]; B uint8 [N, K / block, block / 2] (byte i
// of a block holds code 2i in its low nibble, 2i + 1 in its high one); scales float
// [N * K / block]; zero_points uint8 (optional; per row, two 4-bit zero points a byte, low nibble
// first, rows padded to whole bytes; 8 when absent); bias float [N] (optional). Attributes K, N,
// block_size (a multiple of 32 dividing K), accuracy_level (1, default: fp32 activations; 4: each
// row of A rounded to int8 per block of K, codes round(a * 127 / max|a|) with the block's scale
// max|a| / 127, integer dot products: MatMulNBits' accuracy level 4).
//
// Why it is faster than MatMulNBits at accuracy level 1: the weight is read where onnxruntime
// keeps it (no prepacked copy) and dequantized with one permute per 16 codes from a 16-entry
// table already shifted by the block's zero point and multiplied by its scale (vpermps reads
// only the low 4 bits of each index, so the code byte needs no mask), instead of convert +
// subtract + multiply. A is split
// into its even and odd columns once per call so that low and high nibbles meet their
// activations in order. Rows of the output are shared out on onnxruntime's intra-op threads.
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ort_kernel.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LRQ_X86 1
#endif

namespace {

using ort_abi::Api;
using namespace lrq_ort;

constexpr const char* kDomain = "ai.lrq.cpu";
constexpr const char* kOpName = "MatMulInt4";
constexpr int64_t kRowsPerTask = 64;
constexpr int64_t kPrefetchRows = 8;  // decode: how far ahead of the rows being summed the weights are fetched

struct Shape {
  int64_t M, K, N, block;
};

struct Problem {
  Shape shape;
  const float* a_split;  // A with each 32-column chunk as [16 even columns, 16 odd columns]
  const float* a_t;      // a_split transposed in groups of rows (pack_transposed)
  int64_t a_t_stride;    // rows of A padded with zeros to a multiple of 16
  const uint8_t* codes;
  const float* scales;
  const uint8_t* zeros;  // nullptr: 8 for every block
  const float* bias;
  float* y;
  // accuracy level 4: A's int8 codes (per 128 columns [64 even, 64 odd] when the block is a
  // multiple of 128, else in order), each block's scale and code sum
  const int8_t* a_codes;
  const float* a_scales;
  const int32_t* a_sums;
  const float* a_scaled_sums;  // a_scales * a_sums
};

inline int zero_point(const Problem& p, int64_t n, int64_t b) {
  if (p.zeros == nullptr) return 8;
  const int64_t bytes_per_row = (p.shape.K / p.shape.block + 1) / 2;
  return (p.zeros[n * bytes_per_row + b / 2] >> (4 * (b & 1))) & 15;
}

// A^T in groups of 32 rows of A (the last 16 or 32 wide, zero-padded): group g holds
// [K][width] contiguously, so the prefill GEMM streams it in order.
constexpr int64_t kGroupRows = 32;

void pack_transposed(const float* a_split, float* out, int64_t rows, int64_t K, int64_t padded) {
  constexpr int64_t kSpan = 64;  // columns per pass: the reads stay sequential, the writes within L1
  for (int64_t g0 = 0; g0 < padded; g0 += kGroupRows) {
    const int64_t width = std::min(kGroupRows, padded - g0);
    float* group = out + g0 * K;
    for (int64_t k0 = 0; k0 < K; k0 += kSpan) {
      const int64_t k1 = std::min(K, k0 + kSpan);
      for (int64_t j = 0; j < width; ++j) {
        const float* row = g0 + j < rows ? a_split + (g0 + j) * K : nullptr;
        for (int64_t k = k0; k < k1; ++k) group[k * width + j] = row ? row[k] : 0.f;
      }
    }
  }
}

void split_even_odd(const float* a, float* out, int64_t rows, int64_t K) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = a + r * K;
    float* dst = out + r * K;
    for (int64_t c = 0; c < K; c += 32) {
      for (int j = 0; j < 16; ++j) {
        dst[c + j] = src[c + 2 * j];
        dst[c + 16 + j] = src[c + 2 * j + 1];
      }
    }
  }
}

struct QuantizedRows {
  std::vector<int8_t> codes;
  std::vector<float> scales;
  std::vector<int32_t> sums;
  std::vector<float> scaled_sums;
};

// Accuracy level 4: each block of each row of A as int8 codes, its scale and its code sum.
void quantize_rows(const float* a, const Shape& s, bool split128, QuantizedRows& q) {
  const int64_t blocks = s.K / s.block;
  q.codes.resize(size_t(s.M * s.K));
  q.scales.resize(size_t(s.M * blocks));
  q.sums.resize(size_t(s.M * blocks));
  q.scaled_sums.resize(size_t(s.M * blocks));
  for (int64_t m = 0; m < s.M; ++m) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* x = a + m * s.K + b * s.block;
      float amax = 0.f;
      for (int64_t j = 0; j < s.block; ++j) amax = std::max(amax, std::fabs(x[j]));
      const float inverse = amax > 0.f ? 127.f / amax : 0.f;
      int32_t sum = 0;
      int8_t* out = q.codes.data() + m * s.K + b * s.block;
      for (int64_t j = 0; j < s.block; ++j) {
        const int code = std::max(-127, std::min(127, int(std::nearbyint(x[j] * inverse))));
        const int64_t at = split128 ? (j / 128) * 128 + (j % 2) * 64 + (j % 128) / 2 : j;
        out[at] = int8_t(code);
        sum += code;
      }
      q.scales[m * blocks + b] = amax / 127.f;
      q.sums[m * blocks + b] = sum;
      q.scaled_sums[m * blocks + b] = q.scales[m * blocks + b] * float(sum);
    }
  }
}

// Accuracy level 4, any CPU.
void rows_int8_portable(const Problem& p, int64_t n0, int64_t n1) {
  const Shape& s = p.shape;
  const int64_t blocks = s.K / s.block;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.codes + n * (s.K / 2);
    for (int64_t m = 0; m < s.M; ++m) {
      const int8_t* a = p.a_codes + m * s.K;
      float total = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        int32_t dot = 0;
        for (int64_t k = b * s.block; k < (b + 1) * s.block; k += 2) {
          dot += int32_t(row[k / 2] & 15) * a[k] + int32_t(row[k / 2] >> 4) * a[k + 1];
        }
        const float scale = p.scales[n * blocks + b] * p.a_scales[m * blocks + b];
        total += scale * float(dot - zero_point(p, n, b) * p.a_sums[m * blocks + b]);
      }
      p.y[m * s.N + n] = total + (p.bias ? p.bias[n] : 0.f);
    }
  }
}

// The portable form: any CPU, the same sums in the same association per block.
void rows_portable(const Problem& p, int64_t n0, int64_t n1) {
  const Shape& s = p.shape;
  const int64_t blocks = s.K / s.block;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.codes + n * (s.K / 2);
    const float* scale = p.scales + n * blocks;
    for (int64_t m = 0; m < s.M; ++m) {
      const float* a = p.a_split + m * s.K;
      float total = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        float block_sum = 0.f;
        const int zero = zero_point(p, n, b);
        for (int64_t c = b * s.block; c < (b + 1) * s.block; c += 32) {
          const uint8_t* bytes = row + c / 2;
          for (int j = 0; j < 16; ++j) {
            block_sum += float((bytes[j] & 15) - zero) * a[c + j];
            block_sum += float((bytes[j] >> 4) - zero) * a[c + 16 + j];
          }
        }
        total += scale[b] * block_sum;
      }
      p.y[m * s.N + n] = total + (p.bias ? p.bias[n] : 0.f);
    }
  }
}

#if LRQ_X86
#define LRQ_AVX512 __attribute__((target("avx512f")))

// scale * (code - zero) for the 16 codes.
LRQ_AVX512 inline __m512 code_table(const Problem& p, int64_t n, int64_t b) {
  const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const float scale = p.scales[n * (p.shape.K / p.shape.block) + b];
  return _mm512_mul_ps(_mm512_set1_ps(scale), _mm512_sub_ps(codes, _mm512_set1_ps(float(zero_point(p, n, b)))));
}

// 16 low-nibble and 16 high-nibble weights of one 32-column chunk, scaled.
LRQ_AVX512 inline void dequantize_chunk(const uint8_t* bytes, __m512 table, __m512& low, __m512& high) {
  const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  low = _mm512_permutexvar_ps(codes, table);
  high = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), table);
}

// R weight rows against one row of A over all of K: R accumulators in registers, each loaded
// chunk of A feeds 2R FMAs, the weights of the rows R ahead prefetched (they are read once).
template <int R>
LRQ_AVX512 void gemv_tile(const Problem& p, int64_t n, int64_t m) {
  const Shape& s = p.shape;
  const float* a = p.a_split + m * s.K;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < s.K / s.block; ++b) {
    __m512 table[R];
    for (int r = 0; r < R; ++r) table[r] = code_table(p, n + r, b);
    for (int64_t c = b * s.block; c < (b + 1) * s.block; c += 32) {
      if (c % 128 == 0) {  // one prefetch per 64-byte line of each row
        for (int r = 0; r < R; ++r) {
          const int64_t ahead = std::min(n + kPrefetchRows + r, s.N - 1);
          _mm_prefetch(reinterpret_cast<const char*>(p.codes + ahead * (s.K / 2) + c / 2), _MM_HINT_T0);
        }
      }
      const __m512 a_low = _mm512_loadu_ps(a + c), a_high = _mm512_loadu_ps(a + c + 16);
      for (int r = 0; r < R; ++r) {
        __m512 low, high;
        dequantize_chunk(p.codes + (n + r) * (s.K / 2) + c / 2, table[r], low, high);
        acc[r] = _mm512_fmadd_ps(high, a_high, _mm512_fmadd_ps(low, a_low, acc[r]));
      }
    }
  }
  for (int r = 0; r < R; ++r) p.y[m * s.N + n + r] = _mm512_reduce_add_ps(acc[r]) + (p.bias ? p.bias[n + r] : 0.f);
}

// Decode, a few rows of A, and any block wider than a prefill panel: one pass over K per group of
// four weight rows and row of A.
LRQ_AVX512 void rows_gemv(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < p.shape.M; ++m) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) gemv_tile<4>(p, n, m);
    for (; n < n1; ++n) gemv_tile<1>(p, n, m);
  }
}

// Prefill: the classic outer-product GEMM on Y^T. A panel of twelve weight rows is dequantized
// into an L1 buffer, then for 32 rows of A at a time (two vectors of A^T per column of K) each
// weight is broadcast into 2 FMAs (24 accumulators); the sums of a panel are added to an
// accumulator of the twelve rows, which is written to Y once K is done.
constexpr int64_t kGemvRows = 4;  // up to this many rows of A, one pass over the weights per row beats padding to 16
constexpr int kPrefillRows = 12;
constexpr int64_t kPrefillRowsPerTask = 8 * kPrefillRows;
constexpr int64_t kPanelColumns = 256;
constexpr int64_t kRowsOfAPerPass = 256;  // rows of A^T kept in L2 while the weight rows pass (a multiple of 32)

template <int V>
LRQ_AVX512 void outer_product(const float (*w)[kPanelColumns], const float* a_t, int64_t a_stride, int64_t columns,
                              float* sums, int64_t sums_stride) {
  __m512 acc[kPrefillRows][V];
  for (int r = 0; r < kPrefillRows; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
#pragma GCC unroll 4  // without it the loop runs at about half the FMA peak (measured: 42 vs 77 GMAC/s)
  for (int64_t k = 0; k < columns; ++k) {
    __m512 a[V];
    for (int v = 0; v < V; ++v) a[v] = _mm512_loadu_ps(a_t + k * a_stride + 16 * v);
    for (int r = 0; r < kPrefillRows; ++r) {
      const __m512 weight = _mm512_set1_ps(w[r][k]);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(weight, a[v], acc[r][v]);
    }
  }
  for (int r = 0; r < kPrefillRows; ++r)
    for (int v = 0; v < V; ++v) {
      float* out = sums + r * sums_stride + 16 * v;
      _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), acc[r][v]));
    }
}

LRQ_AVX512 void dequantize_panel(const Problem& p, int64_t n, int rows, int64_t k0, int64_t columns,
                                 float (*w)[kPanelColumns]) {
  const Shape& s = p.shape;
  for (int r = 0; r < kPrefillRows; ++r) {
    if (r >= rows) {
      memset(w[r], 0, sizeof(float) * kPanelColumns);
      continue;
    }
    const uint8_t* codes = p.codes + (n + r) * (s.K / 2);
    for (int64_t c = 0; c < columns; c += 32) {
      const int64_t k = k0 + c;
      __m512 low, high;
      dequantize_chunk(codes + k / 2, code_table(p, n + r, k / s.block), low, high);
      _mm512_store_ps(w[r] + c, low);
      _mm512_store_ps(w[r] + c + 16, high);
    }
  }
}

// Loop order: per pass of rows of A, K panel by K panel, every weight row of the task meets the
// panel's slice of A^T (256 columns x 256 rows, kept in L2) before the next slice is read; A^T as a
// whole (64 rows x 11008 columns of down_proj: 2.8 MB) is then read once per task, not once per 12
// weight rows.
LRQ_AVX512 void rows_gemm(const Problem& p, int64_t n0, int64_t n1) {
  const Shape& s = p.shape;
  const int64_t stride = p.a_t_stride;  // blocks here are at most a panel wide and divide it
  alignas(64) float w[kPrefillRows][kPanelColumns];
  thread_local std::vector<float> sums;  // [weight row of the task][row of A in the pass]
  for (int64_t m0 = 0; m0 < stride; m0 += kRowsOfAPerPass) {
    const int64_t m1 = std::min(stride, m0 + kRowsOfAPerPass), pass = m1 - m0;
    sums.assign(size_t((n1 - n0 + kPrefillRows) * pass), 0.f);  // slack: a last panel's zero rows add into it
    for (int64_t k0 = 0; k0 < s.K; k0 += kPanelColumns) {
      const int64_t columns = std::min(kPanelColumns, s.K - k0);
      for (int64_t n = n0; n < n1; n += kPrefillRows) {
        const int rows = int(std::min<int64_t>(kPrefillRows, n1 - n));
        dequantize_panel(p, n, rows, k0, columns, w);
        float* out = sums.data() + (n - n0) * pass;
        for (int64_t m = m0; m < m1; m += kGroupRows) {
          const int64_t width = std::min(kGroupRows, stride - m);
          const float* group = p.a_t + m * s.K + k0 * width;
          if (width == 32) {
            outer_product<2>(w, group, width, columns, out + (m - m0), pass);
          } else {
            outer_product<1>(w, group, width, columns, out + (m - m0), pass);
          }
        }
      }
    }
    for (int64_t m = m0; m < std::min(m1, s.M); ++m)  // row by row of Y: the task's outputs of one row are adjacent
      for (int64_t n = n0; n < n1; ++n) p.y[m * s.N + n] = sums[(n - n0) * pass + (m - m0)] + (p.bias ? p.bias[n] : 0.f);
  }
}

// Accuracy level 4: int8 dot products of 4-bit codes (unsigned) and A's int8 codes, 64 codes a
// byte load: the low nibbles of a 64-byte chunk meet A's 64 even columns, the high ones its 64
// odd columns. With AVX512-VNNI one vpdpbusd per 64 products; without, vpmaddubsw + vpmaddwd
// (at most 2 * 15 * 127 per 16-bit pair: no saturation).
#define LRQ_AVX512_INT8 __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define LRQ_AVX512_BW __attribute__((target("avx512f,avx512bw")))

LRQ_AVX512_INT8 inline __m512i dot_vnni(__m512i acc, __m512i codes, __m512i a) { return _mm512_dpbusd_epi32(acc, codes, a); }

LRQ_AVX512_BW inline __m512i dot_bw(__m512i acc, __m512i codes, __m512i a) {
  const __m512i pairs = _mm512_maddubs_epi16(codes, a);
  return _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
}

// R weight rows x T rows of A; each 64-byte chunk of weights is unpacked once for the T rows.
#define LRQ_INT8_TILE(NAME, TARGET, DOT)                                                                              \
  template <int R, int T>                                                                                             \
  TARGET void NAME(const Problem& p, int64_t n, int64_t m) {                                                          \
    const Shape& s = p.shape;                                                                                         \
    const int64_t blocks = s.K / s.block;                                                                             \
    const __m512i low_nibbles = _mm512_set1_epi8(0x0F);                                                               \
    __m512 acc[R][T];                                                                                                 \
    float correction[R][T];                                                                                           \
    for (int r = 0; r < R; ++r)                                                                                       \
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps(), correction[r][t] = 0.f;                          \
    for (int64_t b = 0; b < blocks; ++b) {                                                                            \
      __m512i dot[R][T], odd_dot[R][T]; /* two chains: the even and the odd columns */                                \
      for (int r = 0; r < R; ++r)                                                                                     \
        for (int t = 0; t < T; ++t) dot[r][t] = odd_dot[r][t] = _mm512_setzero_si512();                              \
      for (int64_t c = b * s.block; c < (b + 1) * s.block; c += 128) {                                                \
        __m512i low[R], high[R];                                                                                      \
        for (int r = 0; r < R; ++r) {                                                                                 \
          const __m512i bytes = _mm512_loadu_si512(p.codes + (n + r) * (s.K / 2) + c / 2);                            \
          low[r] = _mm512_and_si512(bytes, low_nibbles);                                                              \
          high[r] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low_nibbles);                                       \
        }                                                                                                             \
        for (int t = 0; t < T; ++t) {                                                                                 \
          const int8_t* a = p.a_codes + (m + t) * s.K + c;                                                            \
          const __m512i even = _mm512_loadu_si512(a), odd = _mm512_loadu_si512(a + 64);                              \
          for (int r = 0; r < R; ++r) {                                                                               \
            dot[r][t] = DOT(dot[r][t], low[r], even);                                                                 \
            odd_dot[r][t] = DOT(odd_dot[r][t], high[r], odd);                                                         \
          }                                                                                                           \
        }                                                                                                             \
      }                                                                                                               \
      for (int r = 0; r < R; ++r) {                                                                                   \
        const float w_scale = p.scales[(n + r) * blocks + b];                                                         \
        for (int t = 0; t < T; ++t) {                                                                                 \
          const __m512 scale = _mm512_set1_ps(w_scale * p.a_scales[(m + t) * blocks + b]);                            \
          const __m512i both = _mm512_add_epi32(dot[r][t], odd_dot[r][t]);                                           \
          acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(both), scale, acc[r][t]);                                  \
        }                                                                                                             \
      }                                                                                                               \
    }                                                                                                                 \
    /* the zero points: sum over blocks of w_scale * zero * a_scale * sum(a codes), once per tile */                \
    for (int r = 0; r < R; ++r)                                                                                       \
      for (int64_t b = 0; b < blocks; ++b) {                                                                          \
        const float w_zero = p.scales[(n + r) * blocks + b] * float(zero_point(p, n + r, b));                        \
        for (int t = 0; t < T; ++t) correction[r][t] += w_zero * p.a_scaled_sums[(m + t) * blocks + b];              \
      }                                                                                                               \
    for (int r = 0; r < R; ++r)                                                                                       \
      for (int t = 0; t < T; ++t)                                                                                     \
        p.y[(m + t) * s.N + n + r] =                                                                                  \
            _mm512_reduce_add_ps(acc[r][t]) - correction[r][t] + (p.bias ? p.bias[n + r] : 0.f);                     \
  }

LRQ_INT8_TILE(tile_int8_vnni, LRQ_AVX512_INT8, dot_vnni)
LRQ_INT8_TILE(tile_int8_bw, LRQ_AVX512_BW, dot_bw)

// Decode: one weight row at a time, so the weights stream from memory in address order (measured on
// an AMD EPYC, LLaMA-7B's gate_up at one row of A: 2.4 ms, at MatMulNBits' speed, against 4.5 ms
// for four rows at a time with software prefetch, whose four streams 2 KB apart read at 10 GB/s).
// More rows of A: 2 weight rows x 4 rows of A per tile (the task's weight rows stay in L2 across
// the rows of A).
template <template <int, int> class Tiles>
void rows_int8(const Problem& p, int64_t n0, int64_t n1) {
  int64_t m = 0;
  for (; p.shape.M > 1 && m + 4 <= p.shape.M; m += 4) {
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) Tiles<2, 4>::run(p, n, m);
    for (; n < n1; ++n) Tiles<1, 4>::run(p, n, m);
  }
  for (; m < p.shape.M; ++m) {
    int64_t n = n0;
    for (; n < n1; ++n) Tiles<1, 1>::run(p, n, m);
  }
}

template <int R, int T>
struct VnniTiles {
  static void run(const Problem& p, int64_t n, int64_t m) { tile_int8_vnni<R, T>(p, n, m); }
};

// Prefill with int8 activations on AVX512-VNNI: the lanes of a vector are 16 weight rows (output
// columns), not 16 stretches of K. A panel of 32 weight rows x up to 512 columns is unpacked once
// into L1 as [4-column group][row] bytes (in A's split order: a 128-column chunk is its 64 even
// columns, then its 64 odd ones), and every row of A meets it: per 4 columns one broadcast of
// A's 4 codes and two vpdpbusd (32 rows). At a block's end the zero point comes off in integers
// (dot - zero * sum(a codes), exact) and the block's scales go on with one FMA per 16 outputs,
// instead of a convert, a scale and an FMA per output (the tiles above).
constexpr int64_t kPanelWeightRows = 32;
constexpr int64_t kInt8PanelColumns = 512;

struct Int8Panel {
  std::vector<int32_t> codes;  // [columns / 4][32]: 4 codes of one row per element
  std::vector<float> scales;   // [blocks of the panel][32]
  std::vector<int32_t> zeros;  // [blocks of the panel][32]
};

LRQ_AVX512_INT8 void unpack_int8_panel(const Problem& p, int64_t n, int64_t k0, int64_t columns, Int8Panel& panel) {
  const Shape& s = p.shape;
  const int64_t blocks = s.K / s.block, panel_blocks = columns / s.block;
  panel.codes.resize(size_t(columns / 4 * kPanelWeightRows));
  panel.scales.resize(size_t(panel_blocks * kPanelWeightRows));
  panel.zeros.resize(size_t(panel_blocks * kPanelWeightRows));
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  alignas(64) int32_t unpacked[32];
  for (int64_t r = 0; r < kPanelWeightRows; ++r) {
    const uint8_t* row = p.codes + (n + r) * (s.K / 2) + k0 / 2;
    for (int64_t c = 0; c < columns; c += 128) {
      const __m512i bytes = _mm512_loadu_si512(row + c / 2);
      _mm512_store_si512(unpacked, _mm512_and_si512(bytes, low_nibbles));
      _mm512_store_si512(unpacked + 16, _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low_nibbles));
      int32_t* out = panel.codes.data() + c / 4 * kPanelWeightRows + r;
      for (int g = 0; g < 32; ++g) out[g * kPanelWeightRows] = unpacked[g];
    }
    for (int64_t b = 0; b < panel_blocks; ++b) {
      const int64_t block = k0 / s.block + b;
      panel.scales[size_t(b * kPanelWeightRows + r)] = p.scales[(n + r) * blocks + block];
      panel.zeros[size_t(b * kPanelWeightRows + r)] = zero_point(p, n + r, block);
    }
  }
}

// T rows of A against the panel; the sums are added to Y (which holds the earlier panels' sums).
template <int T>
LRQ_AVX512_INT8 void int8_panel_rows(const Problem& p, const Int8Panel& panel, int64_t n, int64_t k0, int64_t columns,
                                     int64_t m) {
  const Shape& s = p.shape;
  const int64_t blocks = s.K / s.block, groups = s.block / 4;
  __m512 acc[T][2];
  for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < columns / s.block; ++b) {
    __m512i dot[T][2];
    for (int t = 0; t < T; ++t) dot[t][0] = dot[t][1] = _mm512_setzero_si512();
    const int32_t* w = panel.codes.data() + b * groups * kPanelWeightRows;
    const int8_t* a = p.a_codes + m * s.K + k0 + b * s.block;
    for (int64_t g = 0; g < groups; ++g, w += kPanelWeightRows) {
      const __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 16);
      for (int t = 0; t < T; ++t) {
        int32_t four;
        memcpy(&four, a + t * s.K + 4 * g, 4);
        const __m512i codes = _mm512_set1_epi32(four);
        dot[t][0] = _mm512_dpbusd_epi32(dot[t][0], w0, codes);
        dot[t][1] = _mm512_dpbusd_epi32(dot[t][1], w1, codes);
      }
    }
    const int64_t block = k0 / s.block + b;
    for (int h = 0; h < 2; ++h) {
      const __m512 w_scale = _mm512_loadu_ps(panel.scales.data() + b * kPanelWeightRows + 16 * h);
      const __m512i zero = _mm512_loadu_si512(panel.zeros.data() + b * kPanelWeightRows + 16 * h);
      for (int t = 0; t < T; ++t) {
        const int64_t at = (m + t) * blocks + block;
        const __m512i exact = _mm512_sub_epi32(dot[t][h], _mm512_mullo_epi32(zero, _mm512_set1_epi32(p.a_sums[at])));
        acc[t][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), _mm512_mul_ps(w_scale, _mm512_set1_ps(p.a_scales[at])),
                                    acc[t][h]);
      }
    }
  }
  for (int t = 0; t < T; ++t)
    for (int h = 0; h < 2; ++h) {
      float* y = p.y + (m + t) * s.N + n + 16 * h;
      _mm512_storeu_ps(y, _mm512_add_ps(_mm512_loadu_ps(y), acc[t][h]));
    }
}

void rows_int8_panels(const Problem& p, int64_t n0, int64_t n1) {
  const Shape& s = p.shape;
  const int64_t width = s.block * std::max<int64_t>(1, kInt8PanelColumns / s.block);  // whole blocks
  thread_local Int8Panel panel;
  int64_t n = n0;
  for (; n + kPanelWeightRows <= n1; n += kPanelWeightRows) {
    for (int64_t m = 0; m < s.M; ++m)
      for (int64_t r = 0; r < kPanelWeightRows; ++r) p.y[m * s.N + n + r] = p.bias ? p.bias[n + r] : 0.f;
    for (int64_t k0 = 0; k0 < s.K; k0 += width) {
      const int64_t columns = std::min(width, s.K - k0);
      unpack_int8_panel(p, n, k0, columns, panel);
      int64_t m = 0;
      for (; m + 4 <= s.M; m += 4) int8_panel_rows<4>(p, panel, n, k0, columns, m);
      for (; m + 2 <= s.M; m += 2) int8_panel_rows<2>(p, panel, n, k0, columns, m);
      for (; m < s.M; ++m) int8_panel_rows<1>(p, panel, n, k0, columns, m);
    }
  }
  if (n < n1) rows_int8<VnniTiles>(p, n, n1);  // the last rows, fewer than a panel's
}
template <int R, int T>
struct BwTiles {
  static void run(const Problem& p, int64_t n, int64_t m) { tile_int8_bw<R, T>(p, n, m); }
};

// AVX2 CPUs without AVX-512 (fp32 activations): 8-wide, codes converted to float and the zero
// point applied per block as s * (sum(q * a) - z * sum(a)); four weight rows per pass over K.
#define LRQ_AVX2 __attribute__((target("avx2,fma")))

LRQ_AVX2 inline float sum8(__m256 v) {
  const __m128 folded = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pairs = _mm_add_ps(folded, _mm_movehl_ps(folded, folded));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
}

template <int R>
LRQ_AVX2 void tile_avx2(const Problem& p, int64_t n, int64_t m) {
  const Shape& s = p.shape;
  const int64_t blocks = s.K / s.block;
  const float* a = p.a_split + m * s.K;
  const __m256i low_nibble = _mm256_set1_epi32(15);
  __m256 total[R];
  float correction[R];
  for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps(), correction[r] = 0.f;
  for (int64_t b = 0; b < blocks; ++b) {
    __m256 sum[R];
    for (int r = 0; r < R; ++r) sum[r] = _mm256_setzero_ps();
    __m256 a_sum = _mm256_setzero_ps();
    for (int64_t c = b * s.block; c < (b + 1) * s.block; c += 32) {
      for (int h = 0; h < 2; ++h) {
        const __m256 even = _mm256_loadu_ps(a + c + 8 * h), odd = _mm256_loadu_ps(a + c + 16 + 8 * h);
        a_sum = _mm256_add_ps(a_sum, _mm256_add_ps(even, odd));
        for (int r = 0; r < R; ++r) {
          const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.codes + (n + r) * (s.K / 2) + c / 2 + 8 * h));
          const __m256i codes = _mm256_cvtepu8_epi32(bytes);
          sum[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(codes, low_nibble)), even, sum[r]);
          sum[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(codes, 4)), odd, sum[r]);
        }
      }
    }
    const float block_a_sum = sum8(a_sum);
    for (int r = 0; r < R; ++r) {
      const float scale = p.scales[(n + r) * blocks + b];
      total[r] = _mm256_fmadd_ps(sum[r], _mm256_set1_ps(scale), total[r]);
      correction[r] += scale * float(zero_point(p, n + r, b)) * block_a_sum;
    }
  }
  for (int r = 0; r < R; ++r) p.y[m * s.N + n + r] = sum8(total[r]) - correction[r] + (p.bias ? p.bias[n + r] : 0.f);
}

LRQ_AVX2 void rows_avx2(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < p.shape.M; ++m) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) tile_avx2<4>(p, n, m);
    for (; n < n1; ++n) tile_avx2<1>(p, n, m);
  }
}

// Accuracy level 4 on AVX2 CPUs (AMD Zen 2 / 3, Intel before AVX-512): the AVX-512 tile's arithmetic
// 32 bytes at a time, vpmaddubsw + vpmaddwd per 32 products (at most 2 * 15 * 127 per 16-bit pair:
// no saturation), so every block's integer dot product is the one VNNI computes. A's codes are split
// per 128 columns as [64 even, 64 odd]: the low nibbles of weight bytes j .. j + 31 of a 128-column
// chunk meet even codes j .. j + 31, the high nibbles odd codes 64 + j .. 64 + j + 31.
LRQ_AVX2 inline __m256i dot_avx2(__m256i acc, __m256i codes, __m256i a) {
  const __m256i pairs = _mm256_maddubs_epi16(codes, a);
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

template <int R, int T>
LRQ_AVX2 void tile_int8_avx2(const Problem& p, int64_t n, int64_t m) {
  const Shape& s = p.shape;
  const int64_t blocks = s.K / s.block;
  const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
  __m256 acc[R][T];
  float correction[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps(), correction[r][t] = 0.f;
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i dot[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) dot[r][t] = _mm256_setzero_si256();
    for (int64_t c = b * s.block; c < (b + 1) * s.block; c += 128) {
      for (int half = 0; half < 2; ++half) {
        __m256i low[R], high[R];
        for (int r = 0; r < R; ++r) {
          const __m256i bytes = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(p.codes + (n + r) * (s.K / 2) + c / 2 + 32 * half));
          low[r] = _mm256_and_si256(bytes, low_nibbles);
          high[r] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_nibbles);
        }
        for (int t = 0; t < T; ++t) {
          const int8_t* a = p.a_codes + (m + t) * s.K + c + 32 * half;
          const __m256i even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
          const __m256i odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 64));
          for (int r = 0; r < R; ++r) dot[r][t] = dot_avx2(dot_avx2(dot[r][t], low[r], even), high[r], odd);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const float w_scale = p.scales[(n + r) * blocks + b];
      for (int t = 0; t < T; ++t) {
        const __m256 scale = _mm256_set1_ps(w_scale * p.a_scales[(m + t) * blocks + b]);
        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r][t]), scale, acc[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)  // the zero points, as the AVX-512 tile applies them
    for (int64_t b = 0; b < blocks; ++b) {
      const float w_zero = p.scales[(n + r) * blocks + b] * float(zero_point(p, n + r, b));
      for (int t = 0; t < T; ++t) correction[r][t] += w_zero * p.a_scaled_sums[(m + t) * blocks + b];
    }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t)
      p.y[(m + t) * s.N + n + r] = sum8(acc[r][t]) - correction[r][t] + (p.bias ? p.bias[n + r] : 0.f);
}

template <int R, int T>
struct Avx2Tiles {
  static void run(const Problem& p, int64_t n, int64_t m) { tile_int8_avx2<R, T>(p, n, m); }
};

#endif

using RowsFn = void (*)(const Problem&, int64_t, int64_t);

// The code that computes a call: rows of Y a task, and whether it reads A^T packed (prefill).
struct Route {
  RowsFn rows;
  int64_t rows_per_task;
  bool packs_a_t;
};

// LRQ_CPU_KERNEL_ISA=portable or =avx2 caps the code chosen (tests, and comparisons on one machine).
bool isa_capped_at(const char* name) {
  const char* isa = getenv("LRQ_CPU_KERNEL_ISA");
  return isa != nullptr && strcmp(isa, name) == 0;
}

bool avx512_allowed() { return !isa_capped_at("portable") && !isa_capped_at("avx2"); }

// int8 activations: the AVX-512 and AVX2 forms need blocks of a multiple of 128 (A's codes split per 128).
bool int8_fast_path(const Shape& s) {
#if LRQ_X86
  return avx512_allowed() && s.block % 128 == 0 && __builtin_cpu_supports("avx512bw");
#else
  (void)s;
  return false;
#endif
}

bool int8_avx2_path(const Shape& s) {
#if LRQ_X86
  return !isa_capped_at("portable") && s.block % 128 == 0 && __builtin_cpu_supports("avx2") &&
         __builtin_cpu_supports("fma");
#else
  (void)s;
  return false;
#endif
}

Route int8_route(const Shape& s) {
#if LRQ_X86
  if (int8_fast_path(s)) {
    if (!__builtin_cpu_supports("avx512vnni")) return {rows_int8<BwTiles>, kRowsPerTask, false};
    return {s.M > kGemvRows ? rows_int8_panels : rows_int8<VnniTiles>, kRowsPerTask, false};
  }
  if (int8_avx2_path(s)) return {rows_int8<Avx2Tiles>, kRowsPerTask, false};
#endif
  (void)s;
  return {rows_int8_portable, kRowsPerTask, false};
}

Route fp32_route(const Shape& s) {
#if LRQ_X86
  if (avx512_allowed() && __builtin_cpu_supports("avx512f")) {
    if (s.M <= kGemvRows || s.block > kPanelColumns) return {rows_gemv, kRowsPerTask, false};
    return {rows_gemm, kPrefillRowsPerTask, true};
  }
  if (!isa_capped_at("portable") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return {rows_avx2, kRowsPerTask, false};
  }
#endif
  (void)s;
  return {rows_portable, kRowsPerTask, false};
}

// ---- onnxruntime glue ----------------------------------------------------------------------

struct Kernel {
  Api api;
  int64_t K, N, block, accuracy_level;
};

OrtStatus* create_kernel(const OrtCustomOp*, const OrtApi* table, const OrtKernelInfo* info, void** out) {
  Api api{table};
  Kernel kernel{api, 0, 0, 0, 1};
  LRQ_TRY(attribute(api, info, "K", &kernel.K));
  LRQ_TRY(attribute(api, info, "N", &kernel.N));
  LRQ_TRY(attribute(api, info, "block_size", &kernel.block));
  if (OrtStatus* absent = attribute(api, info, "accuracy_level", &kernel.accuracy_level)) {
    api.fn<void (*)(OrtStatus*)>(ort_abi::ReleaseStatus)(absent);
    kernel.accuracy_level = 1;
  }
  if (kernel.accuracy_level == 0) kernel.accuracy_level = 1;
  if (kernel.accuracy_level != 1 && kernel.accuracy_level != 4) {
    return error(api, "ai.lrq.cpu::MatMulInt4: accuracy_level must be 1 (fp32 activations) or 4 (int8 activations)");
  }
  if (kernel.K <= 0 || kernel.N <= 0 || kernel.block <= 0 || kernel.block % 32 != 0 || kernel.K % kernel.block != 0) {
    return error(api, "ai.lrq.cpu::MatMulInt4: block_size must be a positive multiple of 32 dividing K");
  }
  *out = new Kernel(kernel);
  return nullptr;
}

struct Job {
  const Problem* problem;
  RowsFn rows;
  int64_t N, rows_per_task;
};

void run_task(void* user, size_t task) {
  const Job& job = *static_cast<const Job*>(user);
  const int64_t n0 = int64_t(task) * job.rows_per_task;
  job.rows(*job.problem, n0, std::min(job.N, n0 + job.rows_per_task));
}

struct Inputs {
  TensorView a, codes, scales, zeros, bias;
};

OrtStatus* read_inputs(const Kernel& kernel, OrtKernelContext* context, Inputs& in) {
  const Api& api = kernel.api;
  LRQ_TRY(input(api, context, 0, in.a));
  LRQ_TRY(input(api, context, 1, in.codes));
  LRQ_TRY(input(api, context, 2, in.scales));
  size_t count = 0;
  LRQ_TRY(api.fn<OrtStatus* (*)(const OrtKernelContext*, size_t*)>(ort_abi::KernelContext_GetInputCount)(context, &count));
  if (count > 3) LRQ_TRY(input(api, context, 3, in.zeros));
  if (count > 4) LRQ_TRY(input(api, context, 4, in.bias));
  const int64_t blocks = kernel.K / kernel.block;
  if (in.a.dims.empty() || in.a.dims.back() != kernel.K) return error(api, "ai.lrq.cpu::MatMulInt4: A's last axis is not K");
  if (in.codes.elements() != kernel.N * kernel.K / 2 || in.scales.elements() != kernel.N * blocks) {
    return error(api, "ai.lrq.cpu::MatMulInt4: B or scales do not hold N x K codes in blocks of block_size");
  }
  if (in.zeros.data != nullptr && in.zeros.elements() != kernel.N * ((blocks + 1) / 2)) {
    return error(api, "ai.lrq.cpu::MatMulInt4: zero_points do not hold N rows of 4-bit zero points per block");
  }
  if (in.bias.data != nullptr && in.bias.elements() != kernel.N) return error(api, "ai.lrq.cpu::MatMulInt4: bias is not [N]");
  return nullptr;
}

// A in the form the route reads (int8 codes, or split and maybe packed), in scratch kept per
// calling thread across calls (fresh buffers of megabytes would page-fault on every call; the
// tasks of a call only read them).
Route prepare_activations(int64_t accuracy_level, const float* a, Problem& p) {
  const Shape& s = p.shape;
  thread_local std::vector<float> a_split, a_t;
  thread_local QuantizedRows quantized;
  if (accuracy_level == 4) {
    quantize_rows(a, s, int8_fast_path(s) || int8_avx2_path(s), quantized);
    p.a_codes = quantized.codes.data();
    p.a_scales = quantized.scales.data();
    p.a_sums = quantized.sums.data();
    p.a_scaled_sums = quantized.scaled_sums.data();
    return int8_route(s);
  }
  a_split.resize(size_t(s.M * s.K));
  split_even_odd(a, a_split.data(), s.M, s.K);
  p.a_split = a_split.data();
  const Route route = fp32_route(s);
  if (route.packs_a_t) {
    p.a_t_stride = (s.M + 15) / 16 * 16;
    a_t.resize(size_t(s.K * p.a_t_stride));
    pack_transposed(a_split.data(), a_t.data(), s.M, s.K, p.a_t_stride);
    p.a_t = a_t.data();
  }
  return route;
}

OrtStatus* compute(void* state, OrtKernelContext* context) {
  const Kernel& kernel = *static_cast<const Kernel*>(state);
  const Api& api = kernel.api;
  Inputs in;
  LRQ_TRY(read_inputs(kernel, context, in));
  std::vector<int64_t> out_dims = in.a.dims;
  out_dims.back() = kernel.N;
  OrtValue* out = nullptr;
  LRQ_TRY(api.fn<OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**)>(
      ort_abi::KernelContext_GetOutput)(context, 0, out_dims.data(), out_dims.size(), &out));
  void* y = nullptr;
  LRQ_TRY(api.fn<OrtStatus* (*)(const OrtValue*, void**)>(ort_abi::GetTensorMutableData)(out, &y));
  const Shape shape{in.a.elements() / kernel.K, kernel.K, kernel.N, kernel.block};
  if (shape.M == 0) return nullptr;

  Problem problem{shape, nullptr, nullptr, 0, static_cast<const uint8_t*>(in.codes.data),
                  static_cast<const float*>(in.scales.data), static_cast<const uint8_t*>(in.zeros.data),
                  static_cast<const float*>(in.bias.data), static_cast<float*>(y), nullptr, nullptr, nullptr, nullptr};
  const Route route = prepare_activations(kernel.accuracy_level, static_cast<const float*>(in.a.data), problem);
  Job job{&problem, route.rows, shape.N, route.rows_per_task};
  const size_t tasks = size_t((shape.N + route.rows_per_task - 1) / route.rows_per_task);
  return api.fn<OrtStatus* (*)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t, void*)>(
      ort_abi::KernelContext_ParallelFor)(context, run_task, tasks, 0, &job);
}

void destroy(void* state) { delete static_cast<Kernel*>(state); }

OrtCustomOp make_op() {
  OrtCustomOp op = cpu_op(create_kernel, compute, destroy);
  op.GetName = [](const OrtCustomOp*) { return kOpName; };
  op.GetInputType = [](const OrtCustomOp*, size_t index) { return index == 1 || index == 3 ? ONNX_UINT8 : ONNX_FLOAT; };
  op.GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 5; };
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t index) {
    return index >= 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  };
  return op;
}

const OrtCustomOp kMatMulInt4 = make_op();

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                             const OrtApiBase* base) {
  const OrtApi* table = base->GetApi(ort_abi::kApiVersion);
  if (table == nullptr) return nullptr;  // older than 1.17: the session then fails on the unknown op, named
  Api api{table};
  OrtCustomOpDomain* domain = nullptr;
  LRQ_TRY(api.fn<OrtStatus* (*)(const char*, OrtCustomOpDomain**)>(ort_abi::CreateCustomOpDomain)(kDomain, &domain));
  LRQ_TRY(api.fn<OrtStatus* (*)(OrtCustomOpDomain*, const OrtCustomOp*)>(ort_abi::CustomOpDomain_Add)(domain, &kMatMulInt4));
  LRQ_TRY(api.fn<OrtStatus* (*)(OrtCustomOpDomain*, const OrtCustomOp*)>(ort_abi::CustomOpDomain_Add)(
      domain, lrq_ort::quantized_cache_attention_op()));
  return api.fn<OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*)>(ort_abi::AddCustomOpDomain)(options, domain);
}
