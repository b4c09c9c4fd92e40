// What each op of lrq's CPU kernel library shares with the others: statuses, attributes, inputs
// and outputs through onnxruntime's C ABI (ort_abi.h), and running tasks on its intra-op threads.
#pragma once
#include <stdint.h>
#include <string.h>

#include <vector>

#include "ort_abi.h"

namespace lrq_ort {

using ort_abi::Api;

inline OrtStatus* error(const Api& api, const char* message) {
  return api.fn<OrtStatus* (*)(OrtErrorCode, const char*)>(ort_abi::CreateStatus)(ORT_INVALID_ARGUMENT, message);
}

#define LRQ_TRY(call)                       \
  do {                                      \
    if (OrtStatus* status_ = (call)) return status_; \
  } while (0)

inline OrtStatus* attribute(const Api& api, const OrtKernelInfo* info, const char* name, int64_t* out) {
  return api.fn<OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*)>(ort_abi::KernelInfoGetAttribute_int64)(
      info, name, out);
}

inline OrtStatus* float_attribute(const Api& api, const OrtKernelInfo* info, const char* name, float* out) {
  return api.fn<OrtStatus* (*)(const OrtKernelInfo*, const char*, float*)>(ort_abi::KernelInfoGetAttribute_float)(
      info, name, out);
}

struct TensorView {
  const void* data = nullptr;
  std::vector<int64_t> dims;
  int64_t elements() const {
    int64_t n = 1;
    for (int64_t d : dims) n *= d;
    return n;
  }
};

inline OrtStatus* dims_of(const Api& api, const OrtValue* value, std::vector<int64_t>& dims) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  LRQ_TRY(api.fn<OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**)>(ort_abi::GetTensorTypeAndShape)(value, &info));
  size_t rank = 0;
  OrtStatus* status = api.fn<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*)>(ort_abi::GetDimensionsCount)(info, &rank);
  if (status == nullptr) {
    dims.resize(rank);
    status = api.fn<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t)>(ort_abi::GetDimensions)(
        info, dims.data(), rank);
  }
  api.fn<void (*)(OrtTensorTypeAndShapeInfo*)>(ort_abi::ReleaseTensorTypeAndShapeInfo)(info);
  return status;
}

inline OrtStatus* input(const Api& api, OrtKernelContext* context, size_t index, TensorView& view) {
  const OrtValue* value = nullptr;
  LRQ_TRY(api.fn<OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**)>(ort_abi::KernelContext_GetInput)(
      context, index, &value));
  if (value == nullptr) return nullptr;  // an optional input left out
  LRQ_TRY(dims_of(api, value, view.dims));
  void* data = nullptr;
  LRQ_TRY(api.fn<OrtStatus* (*)(const OrtValue*, void**)>(ort_abi::GetTensorMutableData)(value, &data));
  view.data = data;
  return nullptr;
}

// Output `index` of shape `dims`, its data in `data`.
inline OrtStatus* output(const Api& api, OrtKernelContext* context, size_t index, const std::vector<int64_t>& dims,
                         void** data) {
  OrtValue* out = nullptr;
  LRQ_TRY(api.fn<OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**)>(
      ort_abi::KernelContext_GetOutput)(context, index, dims.data(), dims.size(), &out));
  return api.fn<OrtStatus* (*)(const OrtValue*, void**)>(ort_abi::GetTensorMutableData)(out, data);
}

inline OrtStatus* parallel_for(const Api& api, OrtKernelContext* context, void (*task)(void*, size_t), size_t tasks,
                               void* user) {
  return api.fn<OrtStatus* (*)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t, void*)>(
      ort_abi::KernelContext_ParallelFor)(context, task, tasks, 0, user);
}

// An op table with what every op of the library shares: CPU, one float output, required outputs,
// default memory, no variadic arguments, every opset version; the op fills in the rest.
inline OrtCustomOp cpu_op(OrtStatus* (*create)(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void**),
                          OrtStatus* (*compute)(void*, OrtKernelContext*), void (*destroy)(void*)) {
  OrtCustomOp op;
  memset(&op, 0, sizeof(op));
  op.version = ort_abi::kApiVersion;
  op.GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return "CPUExecutionProvider"; };
  op.GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_FLOAT; };
  op.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
  op.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.CreateKernelV2 = create;
  op.KernelComputeV2 = compute;
  op.KernelDestroy = destroy;
  op.GetStartVersion = [](const OrtCustomOp*) { return 1; };
  op.GetEndVersion = [](const OrtCustomOp*) { return 1 << 30; };
  return op;
}

// The library's other ops (one source file each), added to the domain with MatMulInt4.
const OrtCustomOp* quantized_cache_attention_op();

}  // namespace lrq_ort
