// ai.lrq.cpu::QuantizedCacheAttention: causal grouped-query attention that reads a quantized KV
// cache as it is stored (lrq's int8 / int4 / fp8 cache, quant/kv_cache.py), without first writing
// the cache out in float.
//
//   int8 / int4: key[t, d] = k_scale[t] * (k_code[t, d] - k_zero[t])   (per token and head)
//   fp8:         key[t, d] = k_scale * e4m3(k_code[t, d])               (one static scale)
//   out[i]    = softmax_t(scale * q[i] . key[t], t <= past + i) . value  (values alike)
//
// Inputs: query float [B, H, S, D] (rotary applied); key codes uint8 [B, KV, T, D] (bits 8, and
// fp8's E4M3 bit patterns) or [B, KV, T, D / 2] (bits 4: element 2j in the low nibble of byte j,
// 2j + 1 in the high one); key scale float [B, KV, T, 1] (fp8: [1]); key zero uint8 [B, KV, T, 1]
// (fp8: left out); the same three for values. T = past + S: the cache already holds the S new
// tokens, and query i sits at position past + i (no padding). Attributes: bits (8 or 4), e4m3
// (0, default, or 1: the codes are E4M3, bits 8), scale (float). Output float [B, S, H * D], heads in order,
// ready for the output projection. Head h reads key / value head h / (H / KV).
//
// Why it is fast: attention at long context is a read of the whole cache per token; the codes are
// 1 / 4 (int8, fp8) or 1 / 8 (int4) of float32's bytes, and each cached row is dequantized once, into
// L1, where every query row of the task that sees it (the heads of a group, a block of queries) reads
// it (prefill: 32-token tiles met by 8 query rows at a time). Decode with AVX-512 reads the codes
// straight into registers instead.
// The tile loops are written for the compiler to vectorise: one clone per ISA (AVX-512, AVX2,
// baseline) is chosen when the library loads.
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

using namespace lrq_ort;

constexpr const char* kOpName = "QuantizedCacheAttention";
constexpr int64_t kRowsPerTask = 64;  // query rows (heads of a group x queries) that share one pass over the cache

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LRQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LRQ_CLONES
#endif

// How a byte of the cache reads: an int8 code, two int4 codes, or an E4M3 value.
enum Codes { kInt8, kInt4, kE4M3 };

struct Shape {
  int64_t batch, heads, kv_heads, seq, total, dim;
  Codes codes;
  int64_t row_bytes() const { return codes == kInt4 ? dim / 2 : dim; }
  int64_t group() const { return heads / kv_heads; }
};

// One of keys / values: codes with a scale and zero point per token, or (E4M3) one scale and no zero.
struct Cache {
  const uint8_t* codes;
  const float* scales;
  const uint8_t* zeros;  // null: E4M3
  float scale(int64_t t) const { return zeros ? scales[t] : scales[0]; }
  float zero(int64_t t) const { return zeros ? float(zeros[t]) : 0.0f; }
};

struct Problem {
  Shape s;
  float scale;
  const float* query;
  Cache keys, values;
  float* out;
};

// The value of every E4M3 bit pattern (sign, 4 exponent bits of bias 7, 3 mantissa bits; no infinities;
// 0x7F / 0xFF are NaN, which the cache never stores: it saturates at 448).
struct E4M3Table {
  float value[256];
  E4M3Table() {
    for (int c = 0; c < 256; ++c) {
      const int exponent = (c >> 3) & 15, mantissa = c & 7;
      const float magnitude = exponent ? std::ldexp(1.0f + mantissa / 8.0f, exponent - 7) : std::ldexp(mantissa / 8.0f, -6);
      value[c] = (c & 0x7F) == 0x7F ? NAN : (c & 0x80 ? -magnitude : magnitude);
    }
  }
};
const E4M3Table kE4M3Values;

// 16 floats as one vector (GCC / Clang vector extensions: one zmm register in the AVX-512 clone,
// two ymm in the AVX2 one); loads and stores through memcpy, which compiles to unaligned moves.
typedef float Lanes __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

#define LRQ_INLINE inline __attribute__((always_inline))

LRQ_INLINE Lanes load(const float* x) {
  Lanes v;
  memcpy(&v, x, sizeof(v));
  return v;
}

LRQ_INLINE void store(float* x, Lanes v) { memcpy(x, &v, sizeof(v)); }

LRQ_INLINE float sum(Lanes v) {
  float total = 0;
  for (int j = 0; j < kLanes; ++j) total += v[j];
  return total;
}

typedef uint32_t UintLanes __attribute__((vector_size(64)));

// 16 E4M3 codes as floats, without a table: a normal code's exponent and mantissa moved into an fp32's
// with the exponent rebiased (+120), a subnormal one as m / 512; no fp32 subnormal is formed, so a
// session that flushes denormals reads the same values.
LRQ_INLINE Lanes e4m3_lanes(const uint8_t* codes) {
  UintLanes c;
  for (int j = 0; j < kLanes; ++j) c[j] = codes[j];
  const UintLanes magnitude = c & 0x7F;
  const UintLanes normal_bits = (magnitude << 20) + (120u << 23);
  Lanes normal, value;
  memcpy(&normal, &normal_bits, sizeof(normal));
  const Lanes subnormal = __builtin_convertvector(magnitude & 7, Lanes) * (1.0f / 512);
  value = (magnitude >> 3) == 0 ? subnormal : normal;
  UintLanes bits;
  memcpy(&bits, &value, sizeof(bits));
  bits |= (c & 0x80) << 24;
  memcpy(&value, &bits, sizeof(value));
  return value;
}

// One cached row (a token's key or value of one head) in float: scale * (code - zero).
LRQ_INLINE void dequantize_row(const uint8_t* codes, float scale, float zero, int64_t dim, Codes kind, float* out) {
  if (kind == kInt8) {  // a plain loop: GCC's loop vectoriser widens the bytes (vpmovzxbd), its vector extensions do not
    for (int64_t d = 0; d < dim; ++d) out[d] = scale * (float(codes[d]) - zero);
  } else if (kind == kE4M3) {
    int64_t d = 0;
    for (; d + kLanes <= dim; d += kLanes) store(out + d, scale * e4m3_lanes(codes + d));
    for (; d < dim; ++d) out[d] = scale * kE4M3Values.value[codes[d]];
  } else {
    for (int64_t j = 0; j < dim / 2; ++j) {
      out[2 * j] = scale * (float(codes[j] & 15) - zero);
      out[2 * j + 1] = scale * (float(codes[j] >> 4) - zero);
    }
  }
}

LRQ_INLINE float dot(const float* a, const float* b, int64_t dim) {
  Lanes acc = {};
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) acc += load(a + d) * load(b + d);
  float total = sum(acc);
  for (; d < dim; ++d) total += a[d] * b[d];
  return total;
}

LRQ_INLINE void add_scaled(float* acc, float weight, const float* row, int64_t dim) {
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) store(acc + d, load(acc + d) + weight * load(row + d));
  for (; d < dim; ++d) acc[d] += weight * row[d];
}

constexpr int64_t kKeysPerTile = 2 * kLanes;  // two vectors of keys (scores) or 32 value rows per tile

#if LRQ_X86
// Decode on AVX-512: the codes widened and converted in registers (no float row written out),
// q . key = k_scale * (q . codes - k_zero * sum(q)). int4: 8 bytes give 16 codes, low nibbles
// interleaved with high ones (element 2j is byte j's low nibble). E4M3: each byte's exponent and
// mantissa moved into an fp16's (seee emmm -> s0ee eemm m000 0000) and widened by vcvtph2ps, exact
// for normals and subnormals alike; that reads 2^-8 of the value (fp16's bias 15 against E4M3's 7),
// which `code_unit` puts back through the scale.
#define LRQ_AVX512 __attribute__((target("avx512f")))

template <Codes Kind>
constexpr float code_unit() { return Kind == kE4M3 ? 256.0f : 1.0f; }

template <Codes Kind>
LRQ_AVX512 inline __m512 codes_as_floats(const uint8_t* row, int64_t d) {
  __m128i codes;
  if (Kind == kE4M3) {
    const __m256i wide = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d)));
    const __m256i half = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(wide, _mm256_set1_epi16(0x7F)), 7),
                                         _mm256_slli_epi16(_mm256_and_si256(wide, _mm256_set1_epi16(0x80)), 8));
    return _mm512_cvtph_ps(half);
  }
  if (Kind == kInt8) {
    codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d));
  } else {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + d / 2)), mask = _mm_set1_epi8(15);
    codes = _mm_unpacklo_epi8(_mm_and_si128(bytes, mask), _mm_and_si128(_mm_srli_epi16(bytes, 4), mask));
  }
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes));
}

template <Codes Kind>
LRQ_AVX512 float dot_codes_avx512(const float* q, const uint8_t* row, int64_t dim) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), codes_as_floats<Kind>(row, d), acc);
  return _mm512_reduce_add_ps(acc);
}

template <Codes Kind>
LRQ_AVX512 void add_codes_avx512(float* acc, float weight, const uint8_t* row, int64_t dim) {
  const __m512 w = _mm512_set1_ps(weight);
  for (int64_t d = 0; d < dim; d += 16)
    _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(w, codes_as_floats<Kind>(row, d), _mm512_loadu_ps(acc + d)));
}

bool rows_in_registers(const Shape& s) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512 && s.dim % 16 == 0;
}
#else
bool rows_in_registers(const Shape&) { return false; }
template <Codes Kind>
constexpr float code_unit() { return 1.0f; }
template <Codes Kind>
float dot_codes_avx512(const float*, const uint8_t*, int64_t) { return 0; }
template <Codes Kind>
void add_codes_avx512(float*, float, const uint8_t*, int64_t) {}
#endif

// The query rows of one task: `count` rows starting at row `first` of a key/value head's group,
// rows ordered query-major (query i, then the group's heads).
struct Rows {
  int64_t b, kv, first, count;
};

constexpr int64_t kRowsForTiles = 4;  // fewer query rows (decode): one key row at a time

// Prefill and chunks: the keys dequantized 32 at a time into a transposed tile every query row reads.
constexpr int kRowsPerGroup = 8;  // query rows computed together: 8 x 2 vectors of sums per tile

// Dequantize keys / values t0 .. t0 + count - 1 (count <= 32) into a tile: transposed (tile[d * 32 + j],
// keys: two vectors of 32 scores per query) or by row (tile[j * dim + d], values); missing rows zero.
LRQ_INLINE void dequantize_tile(const Problem& p, const Cache& cache, int64_t first, int64_t count, bool transposed,
                                float* row, float* tile) {
  const Shape& s = p.s;
  const int64_t dim = s.dim, bytes = s.row_bytes();
  for (int64_t j = 0; j < kKeysPerTile; ++j) {
    float* into = transposed ? row : tile + j * dim;
    if (j < count) {
      const int64_t t = first + j;
      dequantize_row(cache.codes + t * bytes, cache.scale(t), cache.zero(t), dim, s.codes, into);
    } else {
      std::fill(into, into + dim, 0.0f);
    }
    if (transposed)
      for (int64_t d = 0; d < dim; ++d) tile[d * kKeysPerTile + j] = row[d];
  }
}

// acc[r][v] += sum over k < count of a[r][k] * b[k * stride + 16 v]: R rows against 32 columns, the
// register-blocked shape of a GEMM micro-kernel (per k two vector loads, R broadcasts, 2R FMAs).
template <int R>
LRQ_INLINE void outer_product(const float* const* a, const float* b, int64_t stride, int64_t count, Lanes (*acc)[2]) {
  for (int64_t k = 0; k < count; ++k) {
    const Lanes b0 = load(b + k * stride), b1 = load(b + k * stride + kLanes);
    for (int r = 0; r < R; ++r) {
      const float x = a[r][k];
      acc[r][0] += x * b0;
      acc[r][1] += x * b1;
    }
  }
}

// Prefill and chunks: keys and values dequantized 32 at a time into tiles every query row reads.
// Rows are in query order, so each row sees at least the tokens the rows before it see.
LRQ_INLINE void score_tiles(const Problem& p, int64_t cache, int64_t count, const float* const* query,
                            const int64_t* last, int64_t reach, float* scores) {
  const Shape& s = p.s;
  thread_local std::vector<float> tile, row;
  tile.resize(size_t(s.dim * kKeysPerTile));
  row.resize(size_t(s.dim));
  for (int64_t t0 = 0; t0 < reach; t0 += kKeysPerTile) {
    dequantize_tile(p, p.keys, cache + t0, std::min(kKeysPerTile, reach - t0), true, row.data(), tile.data());
    for (int64_t r0 = 0; r0 < count; r0 += kRowsPerGroup) {
      const int64_t rows = std::min<int64_t>(kRowsPerGroup, count - r0);
      if (t0 > last[r0 + rows - 1]) continue;
      const float* q[kRowsPerGroup];
      for (int i = 0; i < kRowsPerGroup; ++i) q[i] = query[std::min<int64_t>(r0 + i, count - 1)];
      Lanes acc[kRowsPerGroup][2] = {};
      outer_product<kRowsPerGroup>(q, tile.data(), kKeysPerTile, s.dim, acc);
      for (int64_t r = r0; r < r0 + rows; ++r)
        for (int64_t j = 0; j < kKeysPerTile && t0 + j <= last[r]; ++j)
          scores[r * s.total + t0 + j] = p.scale * acc[r - r0][j / kLanes][j % kLanes];
    }
  }
}

LRQ_INLINE void value_tiles(const Problem& p, int64_t cache, int64_t count, float* const* out, const int64_t* last,
                            int64_t reach, const float* weights) {
  const Shape& s = p.s;
  const int64_t dim = s.dim;
  thread_local std::vector<float> tile;
  tile.resize(size_t(dim * kKeysPerTile));
  float tile_weights[kRowsPerGroup][kKeysPerTile];
  for (int64_t t0 = 0; t0 < reach; t0 += kKeysPerTile) {
    dequantize_tile(p, p.values, cache + t0, std::min(kKeysPerTile, reach - t0), false, nullptr, tile.data());
    for (int64_t r0 = 0; r0 < count; r0 += kRowsPerGroup) {
      const int64_t rows = std::min<int64_t>(kRowsPerGroup, count - r0);
      if (t0 > last[r0 + rows - 1]) continue;
      const float* w[kRowsPerGroup];
      for (int i = 0; i < kRowsPerGroup; ++i) {  // a row's weights past what it sees (and padding rows): zero
        const int64_t r = r0 + i;
        for (int64_t j = 0; j < kKeysPerTile; ++j)
          tile_weights[i][j] = i < rows && t0 + j <= last[r] ? weights[r * s.total + t0 + j] : 0.0f;
        w[i] = tile_weights[i];
      }
      int64_t d0 = 0;
      for (; d0 + kKeysPerTile <= dim; d0 += kKeysPerTile) {
        Lanes acc[kRowsPerGroup][2] = {};
        outer_product<kRowsPerGroup>(w, tile.data() + d0, dim, kKeysPerTile, acc);
        for (int64_t i = 0; i < rows; ++i) {
          float* o = out[r0 + i] + d0;
          store(o, load(o) + acc[i][0]);
          store(o + kLanes, load(o + kLanes) + acc[i][1]);
        }
      }
      for (; d0 < dim; ++d0)  // a head size that is not a multiple of 32
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < kKeysPerTile; ++j) out[r0 + i][d0] += w[i][j] * tile[j * dim + d0];
    }
  }
}

typedef int32_t IntLanes __attribute__((vector_size(64)));

// exp(x) for x <= 0, 16 at a time (Cephes' expf: x = n ln 2 + r, |r| <= ln 2 / 2, a degree-6
// polynomial in r, 2^n built in the exponent bits; within 2 ulp of std::exp). x below -87 is taken as
// -87 (exp ~ 1.6e-38, so 2^n stays a normal float); softmax's weights that small add nothing.
LRQ_INLINE Lanes exp_lanes(Lanes x) {
  const Lanes lowest = Lanes{} - 87.0f, shift = Lanes{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  x = x < lowest ? lowest : x;
  const Lanes n = (x * 1.44269504088896341f + shift) - shift;
  const Lanes r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  Lanes poly = r * 1.9875691500e-4f + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const Lanes y = poly * r * r + r + 1.0f;
  const IntLanes bits = (__builtin_convertvector(n, IntLanes) + 127) << 23;
  Lanes two_to_n;
  memcpy(&two_to_n, &bits, sizeof(two_to_n));
  return y * two_to_n;
}

// Softmax in place: the exponentials 16 at a time (a scalar std::exp per score took about half of a
// long prefill's time).
LRQ_INLINE void softmax(float* weights, int64_t count) {
  const float top = *std::max_element(weights, weights + count);
  Lanes sums = {};
  int64_t t = 0;
  for (; t + kLanes <= count; t += kLanes) {
    const Lanes e = exp_lanes(load(weights + t) - top);
    store(weights + t, e);
    sums += e;
  }
  float total = sum(sums);
  for (; t < count; ++t) total += weights[t] = std::exp(weights[t] - top);
  const float inverse = 1.0f / total;
  for (t = 0; t < count; ++t) weights[t] *= inverse;
}

// Decode (a few query rows): scores and the weighted sum straight from the codes.
template <Codes Kind>
void attend_rows_in_registers(const Problem& p, int64_t cache, int64_t count, const float* const* query,
                              float* const* out, const int64_t* last, int64_t reach, float* scores) {
  const Shape& s = p.s;
  const int64_t dim = s.dim, bytes = s.row_bytes();
  const float unit = code_unit<Kind>();
  float query_sum[kRowsForTiles], zero_term[kRowsForTiles] = {0};
  for (int64_t r = 0; r < count; ++r) {
    query_sum[r] = 0;
    for (int64_t d = 0; d < dim; ++d) query_sum[r] += query[r][d];
  }
  for (int64_t t = 0; t < reach; ++t) {
    const uint8_t* codes = p.keys.codes + (cache + t) * bytes;
    const float k_scale = p.scale * unit * p.keys.scale(cache + t), k_zero = p.keys.zero(cache + t) / unit;
    for (int64_t r = 0; r < count; ++r)
      if (t <= last[r])
        scores[r * s.total + t] = k_scale * (dot_codes_avx512<Kind>(query[r], codes, dim) - k_zero * query_sum[r]);
  }
  for (int64_t r = 0; r < count; ++r) softmax(scores + r * s.total, last[r] + 1);
  for (int64_t t = 0; t < reach; ++t) {
    const uint8_t* codes = p.values.codes + (cache + t) * bytes;
    for (int64_t r = 0; r < count; ++r) {
      if (t > last[r]) continue;
      const float weight = scores[r * s.total + t] * p.values.scale(cache + t);
      add_codes_avx512<Kind>(out[r], weight * unit, codes, dim);
      zero_term[r] += weight * p.values.zero(cache + t);
    }
  }
  for (int64_t r = 0; r < count; ++r)
    for (int64_t d = 0; d < dim; ++d) out[r][d] -= zero_term[r];
}

// Each cached row is dequantized once into L1 and read by every query row of the task that sees it.
LRQ_CLONES void attend(const Problem& p, const Rows& rows) {
  const Shape& s = p.s;
  const int64_t g = s.group(), bytes = s.row_bytes(), past = s.total - s.seq, dim = s.dim;
  thread_local std::vector<float> scores, row;
  scores.resize(size_t(rows.count * s.total));
  row.resize(size_t(dim));
  std::vector<const float*> query(size_t(rows.count));
  std::vector<float*> out(size_t(rows.count));
  std::vector<int64_t> last(size_t(rows.count));
  int64_t reach = 0;
  for (int64_t r = 0; r < rows.count; ++r) {
    const int64_t i = (rows.first + r) / g, head = rows.kv * g + (rows.first + r) % g;
    query[r] = p.query + ((rows.b * s.heads + head) * s.seq + i) * dim;
    out[r] = p.out + ((rows.b * s.seq + i) * s.heads + head) * dim;
    last[r] = past + i;
    reach = std::max(reach, last[r] + 1);
    std::fill(out[r], out[r] + dim, 0.0f);
  }
  const int64_t cache = (rows.b * s.kv_heads + rows.kv) * s.total;  // first token of this head's cache
  if (rows.count < kRowsForTiles && rows_in_registers(s)) {
    (s.codes == kInt8 ? attend_rows_in_registers<kInt8>
     : s.codes == kInt4 ? attend_rows_in_registers<kInt4> : attend_rows_in_registers<kE4M3>)(
        p, cache, rows.count, query.data(), out.data(), last.data(), reach, scores.data());
    return;
  }
  if (rows.count >= kRowsForTiles) {
    score_tiles(p, cache, rows.count, query.data(), last.data(), reach, scores.data());
    for (int64_t r = 0; r < rows.count; ++r) softmax(&scores[size_t(r * s.total)], last[r] + 1);
    value_tiles(p, cache, rows.count, out.data(), last.data(), reach, scores.data());
    return;
  }
  {
    for (int64_t t = 0; t < reach; ++t) {
      dequantize_row(p.keys.codes + (cache + t) * bytes, p.keys.scale(cache + t), p.keys.zero(cache + t), dim, s.codes,
                     row.data());
      for (int64_t r = 0; r < rows.count; ++r)
        if (t <= last[r]) scores[size_t(r * s.total + t)] = p.scale * dot(query[r], row.data(), dim);
    }
  }
  for (int64_t r = 0; r < rows.count; ++r) softmax(&scores[size_t(r * s.total)], last[r] + 1);  // what row r sees
  for (int64_t t = 0; t < reach; ++t) {
    dequantize_row(p.values.codes + (cache + t) * bytes, p.values.scale(cache + t), p.values.zero(cache + t), dim,
                   s.codes, row.data());
    for (int64_t r = 0; r < rows.count; ++r)
      if (t <= last[r]) add_scaled(out[r], scores[size_t(r * s.total + t)], row.data(), dim);
  }
}

struct Job {
  const Problem* problem;
  int64_t tasks_per_head, rows_per_head;
};

void run_task(void* user, size_t task) {
  const Job& job = *static_cast<const Job*>(user);
  const Shape& s = job.problem->s;
  const int64_t head = int64_t(task) / job.tasks_per_head, part = int64_t(task) % job.tasks_per_head;
  const int64_t first = part * kRowsPerTask;
  attend(*job.problem, {head / s.kv_heads, head % s.kv_heads, first, std::min(kRowsPerTask, job.rows_per_head - first)});
}

struct Kernel {
  Api api;
  Codes codes;
  float scale;
};

OrtStatus* create_kernel(const OrtCustomOp*, const OrtApi* table, const OrtKernelInfo* info, void** out) {
  Api api{table};
  Kernel kernel{api, kInt8, 1.0f};
  int64_t bits = 0, e4m3 = 0;
  LRQ_TRY(attribute(api, info, "bits", &bits));
  if (OrtStatus* absent = attribute(api, info, "e4m3", &e4m3)) {  // graphs from before fp8 caches: integer codes
    api.fn<void (*)(OrtStatus*)>(ort_abi::ReleaseStatus)(absent);
    e4m3 = 0;
  }
  LRQ_TRY(float_attribute(api, info, "scale", &kernel.scale));
  if ((bits != 8 && bits != 4) || (e4m3 != 0 && e4m3 != 1) || (e4m3 && bits != 8))
    return error(api, "ai.lrq.cpu::QuantizedCacheAttention: bits must be 8 or 4, e4m3 0 or 1 (with bits 8)");
  kernel.codes = e4m3 ? kE4M3 : bits == 8 ? kInt8 : kInt4;
  *out = new Kernel(kernel);
  return nullptr;
}

OrtStatus* read_shape(const Kernel& kernel, const TensorView* in, Shape& s) {
  const Api& api = kernel.api;
  const char* bad = "ai.lrq.cpu::QuantizedCacheAttention: expected query [B, H, S, D], key / value codes "
                    "[B, KV, T, D (bits 8) or D / 2 (bits 4)] and scales / zero points [B, KV, T, 1] (e4m3: one "
                    "scale [1] each, no zero points), H a multiple of KV, T >= S, D even";
  if (in[0].dims.size() != 4 || in[1].dims.size() != 4) return error(api, bad);
  s = {in[0].dims[0], in[0].dims[1], in[1].dims[1], in[0].dims[2], in[1].dims[2], in[0].dims[3], kernel.codes};
  if (s.kv_heads <= 0 || s.heads % s.kv_heads || s.total < s.seq || s.dim % 2) return error(api, bad);
  const std::vector<int64_t> codes{s.batch, s.kv_heads, s.total, s.row_bytes()}, per_token{s.batch, s.kv_heads, s.total, 1};
  for (int i : {1, 4})
    if (in[i].dims != codes) return error(api, bad);
  const bool e4m3 = s.codes == kE4M3;
  for (int i : {2, 5})
    if (e4m3 ? in[i].elements() != 1 : in[i].dims != per_token) return error(api, bad);
  for (int i : {3, 6})
    if (e4m3 ? in[i].data != nullptr : in[i].dims != per_token) return error(api, bad);
  return nullptr;
}

OrtStatus* compute(void* state, OrtKernelContext* context) {
  const Kernel& kernel = *static_cast<const Kernel*>(state);
  const Api& api = kernel.api;
  TensorView in[7];
  for (size_t i = 0; i < 7; ++i) LRQ_TRY(input(api, context, i, in[i]));
  Shape s;
  LRQ_TRY(read_shape(kernel, in, s));
  void* out = nullptr;
  LRQ_TRY(output(api, context, 0, {s.batch, s.seq, s.heads * s.dim}, &out));
  if (s.batch * s.seq == 0) return nullptr;
  auto bytes = [&](int i) { return static_cast<const uint8_t*>(in[i].data); };
  auto floats = [&](int i) { return static_cast<const float*>(in[i].data); };
  const Problem problem{s, kernel.scale, floats(0), {bytes(1), floats(2), bytes(3)}, {bytes(4), floats(5), bytes(6)},
                        static_cast<float*>(out)};
  const int64_t rows_per_head = s.group() * s.seq;
  Job job{&problem, (rows_per_head + kRowsPerTask - 1) / kRowsPerTask, rows_per_head};
  return parallel_for(api, context, run_task, size_t(s.batch * s.kv_heads * job.tasks_per_head), &job);
}

void destroy(void* state) { delete static_cast<Kernel*>(state); }

OrtCustomOp make_op() {
  OrtCustomOp op = cpu_op(create_kernel, compute, destroy);
  op.GetName = [](const OrtCustomOp*) { return kOpName; };
  op.GetInputType = [](const OrtCustomOp*, size_t index) {
    return index == 0 || index == 2 || index == 5 ? ONNX_FLOAT : ONNX_UINT8;
  };
  op.GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 7; };
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t index) {  // zero points: not with E4M3 codes
    return index == 3 || index == 6 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  };
  return op;
}

const OrtCustomOp kQuantizedCacheAttention = make_op();

}  // namespace

namespace lrq_ort {
const OrtCustomOp* quantized_cache_attention_op() { return &kQuantizedCacheAttention; }
}  // namespace lrq_ort
