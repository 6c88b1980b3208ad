#include "graph/ops/op_util.h"

#include "ndarray/launch.h"

namespace mx::ops {

void Gemm(Context ctx, OpReq req, bool trans_a, bool trans_b, int64_t m, int64_t n,
          int64_t k, float alpha, const float* a, const float* b, float* c) {
  if (req == OpReq::kNull) return;
  kernel::Gemm("gemm", ctx, trans_a, trans_b, m, n, k, alpha, a, trans_a ? m : k, b,
               trans_b ? k : n, req == OpReq::kAdd ? 1.0f : 0.0f, c);
}

BlockedIo ElementWiseBlocked(const ParsedParams&, const ShapeList& in, const ShapeList& out) {
  BlockedIo io;
  io.uniform = true;
  for (size_t i = 0; i < in.size(); ++i) io.inputs.push_back(static_cast<int>(i));
  for (size_t i = 0; i < out.size(); ++i) io.outputs.push_back(static_cast<int>(i));
  return io;
}

absl::Status AtMostKernelDims(int ndim, const char* op) {
  if (ndim <= kernel::kMaxBroadcastDims) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("input data has ", ndim, " dimensions; ", op,
                                                 " supports at most ", kernel::kMaxBroadcastDims));
}

absl::Status SameShapeInfer(const ParsedParams&, ShapeList* in, ShapeList* out,
                            ShapeList*) {
  Shape s;
  ShapeList all;
  all.push_back(Shape());
  for (size_t i = 0; i < in->size(); ++i) {
    MX_RETURN_IF_ERROR(MergeShape(&all, 0, (*in)[i], absl::StrCat("input ", i)));
  }
  for (size_t i = 0; i < out->size(); ++i) {
    MX_RETURN_IF_ERROR(MergeShape(&all, 0, (*out)[i], absl::StrCat("output ", i)));
  }
  for (size_t i = 0; i < in->size(); ++i) {
    MX_RETURN_IF_ERROR(MergeShape(in, i, all[0], absl::StrCat("input ", i)));
  }
  for (size_t i = 0; i < out->size(); ++i) (*out)[i] = all[0];
  return absl::OkStatus();
}

}  // namespace mx::ops
