// ai.lrq.cpu::QuantizedCacheAttention: causal grouped-query attention that reads a KV cache kept as
// uint8 codes with a float scale and a uint8 zero point per token and head (lrq's int8 / int4 cache,
// quant/kv_cache.py), without first writing the cache out in float.
//
//   key[t, d] = k_scale[t] * (k_code[t, d] - k_zero[t])      (values alike)
//   out[i]    = softmax_t(scale * q[i] . key[t], t <= past + i) . value
//
// Inputs: query float [B, H, S, D] (rotary applied); key codes uint8 [B, KV, T, D] (bits 8) or
// [B, KV, T, D / 2] (bits 4: element 2j in the low nibble of byte j, 2j + 1 in the high one); key
// scale float [B, KV, T, 1]; key zero uint8 [B, KV, T, 1]; the same three for values. T = past + S:
// the cache already holds the S new tokens, and query i sits at position past + i (no padding).
// Attributes: bits (8 or 4), scale (float). Output float [B, S, H * D], heads in order, ready for
// the output projection. Head h reads key / value head h / (H / KV).
//
// Why it is fast: attention at long context is a read of the whole cache per token; the codes are
// 1 / 4 (int8) or 1 / 8 (int4) of float32's bytes. A score is
//   k_scale[t] * (q . k_code[t] - k_zero[t] * sum(q)),
// a dot product of the query with the codes as they are, and the output accumulates
// (p[t] * v_scale[t]) * v_code[t] with one correction for the zero points at the end. The heads of
// a group and a block of queries share each key and value row while it is in L1. The loops are
// written for the compiler to vectorise: one clone per ISA (AVX-512, AVX2, baseline) is chosen when
// the library loads.
#include <string.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ort_kernel.h"

namespace {

using namespace lrq_ort;

constexpr const char* kOpName = "QuantizedCacheAttention";
constexpr int64_t kRowsPerTask = 64;  // query rows (heads of a group x queries) that share one pass over the cache

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LRQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LRQ_CLONES
#endif

struct Shape {
  int64_t batch, heads, kv_heads, seq, total, dim, bits;
  int64_t row_bytes() const { return bits == 4 ? dim / 2 : dim; }
  int64_t group() const { return heads / kv_heads; }
};

struct Problem {
  Shape s;
  float scale;
  const float* query;
  const uint8_t *k_codes, *k_zero, *v_codes, *v_zero;
  const float *k_scale, *v_scale;
  float* out;
};

// q . codes: int8 codes in order; int4 codes against the query split into its even and odd elements.
LRQ_CLONES float dot_codes(const float* q_even, const float* q_odd, const uint8_t* codes, int64_t bytes, int64_t bits) {
  float acc[16] = {0};
  const int64_t whole = bytes / 16 * 16;
  float sum = 0;
  if (bits == 8) {
    for (int64_t d = 0; d < whole; d += 16)
      for (int j = 0; j < 16; ++j) acc[j] += q_even[d + j] * float(codes[d + j]);
    for (int64_t d = whole; d < bytes; ++d) sum += q_even[d] * float(codes[d]);
  } else {
    for (int64_t d = 0; d < whole; d += 16)
      for (int j = 0; j < 16; ++j)
        acc[j] += q_even[d + j] * float(codes[d + j] & 15) + q_odd[d + j] * float(codes[d + j] >> 4);
    for (int64_t d = whole; d < bytes; ++d) sum += q_even[d] * float(codes[d] & 15) + q_odd[d] * float(codes[d] >> 4);
  }
  for (int j = 0; j < 16; ++j) sum += acc[j];
  return sum;
}

// acc += weight * codes (int4: into the even and odd halves).
LRQ_CLONES void add_codes(float* acc_even, float* acc_odd, float weight, const uint8_t* codes, int64_t bytes,
                          int64_t bits) {
  if (bits == 8) {
    for (int64_t d = 0; d < bytes; ++d) acc_even[d] += weight * float(codes[d]);
  } else {
    for (int64_t d = 0; d < bytes; ++d) {
      acc_even[d] += weight * float(codes[d] & 15);
      acc_odd[d] += weight * float(codes[d] >> 4);
    }
  }
}

// The query rows of one task: `count` rows starting at row `first` of a key/value head's group,
// rows ordered query-major (query i, then the group's heads).
struct Rows {
  int64_t b, kv, first, count;
};

struct Scratch {
  std::vector<float> q, q_sum, scores, acc;  // q: each row as [even | odd] halves (int4) or in order
};

void attend(const Problem& p, const Rows& rows) {
  const Shape& s = p.s;
  const int64_t g = s.group(), bytes = s.row_bytes(), past = s.total - s.seq, width = s.bits == 4 ? 2 * bytes : bytes;
  thread_local Scratch scratch;
  scratch.q.resize(size_t(rows.count * width));
  scratch.q_sum.resize(size_t(rows.count));
  scratch.acc.resize(size_t(rows.count * width));
  scratch.scores.resize(size_t(rows.count * s.total));
  std::fill(scratch.acc.begin(), scratch.acc.end(), 0.0f);
  std::vector<int64_t> last(size_t(rows.count)), head(size_t(rows.count)), query(size_t(rows.count));
  int64_t reach = 0;
  for (int64_t r = 0; r < rows.count; ++r) {
    const int64_t row = rows.first + r;
    query[r] = row / g;
    head[r] = rows.kv * g + row % g;
    last[r] = past + query[r];
    reach = std::max(reach, last[r] + 1);
    const float* q = p.query + ((rows.b * s.heads + head[r]) * s.seq + query[r]) * s.dim;
    float* into = &scratch.q[size_t(r * width)];
    float sum = 0;
    for (int64_t d = 0; d < s.dim; ++d) sum += q[d];
    scratch.q_sum[r] = sum;
    if (s.bits == 8) {
      memcpy(into, q, size_t(s.dim) * sizeof(float));
    } else {
      for (int64_t j = 0; j < bytes; ++j) into[j] = q[2 * j], into[bytes + j] = q[2 * j + 1];
    }
  }
  const int64_t cache = (rows.b * s.kv_heads + rows.kv) * s.total;  // first token of this head's cache
  for (int64_t t = 0; t < reach; ++t) {
    const uint8_t* codes = p.k_codes + (cache + t) * bytes;
    const float k_scale = p.k_scale[cache + t] * p.scale, k_zero = float(p.k_zero[cache + t]);
    for (int64_t r = 0; r < rows.count; ++r) {
      if (t > last[r]) continue;
      const float* q = &scratch.q[size_t(r * width)];
      scratch.scores[size_t(r * s.total + t)] =
          k_scale * (dot_codes(q, q + bytes, codes, bytes, s.bits) - k_zero * scratch.q_sum[r]);
    }
  }
  std::vector<float> zero_term(size_t(rows.count), 0.0f);
  for (int64_t r = 0; r < rows.count; ++r) {  // softmax, then each weight times its token's value scale
    float* row = &scratch.scores[size_t(r * s.total)];
    const float top = *std::max_element(row, row + last[r] + 1);
    float total = 0;
    for (int64_t t = 0; t <= last[r]; ++t) total += row[t] = std::exp(row[t] - top);
    for (int64_t t = 0; t <= last[r]; ++t) row[t] *= p.v_scale[cache + t] / total;
  }
  for (int64_t t = 0; t < reach; ++t) {
    const uint8_t* codes = p.v_codes + (cache + t) * bytes;
    const float v_zero = float(p.v_zero[cache + t]);
    for (int64_t r = 0; r < rows.count; ++r) {
      if (t > last[r]) continue;
      const float weight = scratch.scores[size_t(r * s.total + t)];
      float* acc = &scratch.acc[size_t(r * width)];
      add_codes(acc, acc + bytes, weight, codes, bytes, s.bits);
      zero_term[r] += weight * v_zero;
    }
  }
  for (int64_t r = 0; r < rows.count; ++r) {
    const float* acc = &scratch.acc[size_t(r * width)];
    float* out = p.out + ((rows.b * s.seq + query[r]) * s.heads + head[r]) * s.dim;
    for (int64_t d = 0; d < s.dim; ++d) {
      const float code_sum = s.bits == 8 ? acc[d] : (d % 2 ? acc[bytes + d / 2] : acc[d / 2]);
      out[d] = code_sum - zero_term[r];
    }
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
  int64_t bits;
  float scale;
};

OrtStatus* create_kernel(const OrtCustomOp*, const OrtApi* table, const OrtKernelInfo* info, void** out) {
  Api api{table};
  Kernel kernel{api, 8, 1.0f};
  LRQ_TRY(attribute(api, info, "bits", &kernel.bits));
  LRQ_TRY(float_attribute(api, info, "scale", &kernel.scale));
  if (kernel.bits != 8 && kernel.bits != 4) return error(api, "ai.lrq.cpu::QuantizedCacheAttention: bits must be 8 or 4");
  *out = new Kernel(kernel);
  return nullptr;
}

OrtStatus* read_shape(const Kernel& kernel, const TensorView* in, Shape& s) {
  const Api& api = kernel.api;
  const char* bad = "ai.lrq.cpu::QuantizedCacheAttention: expected query [B, H, S, D], key / value codes "
                    "[B, KV, T, D (bits 8) or D / 2 (bits 4)] and scales / zero points [B, KV, T, 1], H a multiple "
                    "of KV, T >= S, D even";
  if (in[0].dims.size() != 4 || in[1].dims.size() != 4) return error(api, bad);
  s = {in[0].dims[0], in[0].dims[1], in[1].dims[1], in[0].dims[2], in[1].dims[2], in[0].dims[3], kernel.bits};
  if (s.kv_heads <= 0 || s.heads % s.kv_heads || s.total < s.seq || s.dim % 2) return error(api, bad);
  const std::vector<int64_t> codes{s.batch, s.kv_heads, s.total, s.row_bytes()}, per_token{s.batch, s.kv_heads, s.total, 1};
  for (int i : {1, 4})
    if (in[i].dims != codes) return error(api, bad);
  for (int i : {2, 3, 5, 6})
    if (in[i].dims != per_token) return error(api, bad);
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
  const Problem problem{s, kernel.scale, floats(0), bytes(1), bytes(3), bytes(4), bytes(6), floats(2), floats(5),
                        static_cast<float*>(out)};
  const int64_t rows_per_head = s.group() * s.seq;
  Job job{&problem, (rows_per_head + kRowsPerTask - 1) / kRowsPerTask, rows_per_head};
  return parallel_for(api, context, run_task, size_t(s.batch * s.kv_heads * job.tasks_per_head), &job);
}

void destroy(void* state) { delete static_cast<Kernel*>(state); }

OrtCustomOp make_op() {
  OrtCustomOp op;
  memset(&op, 0, sizeof(op));
  op.version = ort_abi::kApiVersion;
  op.GetName = [](const OrtCustomOp*) { return kOpName; };
  op.GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return "CPUExecutionProvider"; };
  op.GetInputType = [](const OrtCustomOp*, size_t index) {
    return index == 0 || index == 2 || index == 5 ? ONNX_FLOAT : ONNX_UINT8;
  };
  op.GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 7; };
  op.GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_FLOAT; };
  op.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
  op.KernelDestroy = destroy;
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
  op.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  op.GetStartVersion = [](const OrtCustomOp*) { return 1; };
  op.GetEndVersion = [](const OrtCustomOp*) { return 1 << 30; };
  return op;
}

const OrtCustomOp kQuantizedCacheAttention = make_op();

}  // namespace

namespace lrq_ort {
const OrtCustomOp* quantized_cache_attention_op() { return &kQuantizedCacheAttention; }
}  // namespace lrq_ort
