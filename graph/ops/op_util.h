// Internal helpers for operator definitions.
#ifndef MX_GRAPH_OPS_OP_UTIL_H_
#define MX_GRAPH_OPS_OP_UTIL_H_

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "graph/op.h"

namespace mx::ops {

// Names for the listing functions of OpDef.
inline NameListFn Names(std::vector<std::string> names) {
  return [names](const ParsedParams&) { return names; };
}

// C = alpha * op(A) * op(B) + (req == kAdd ? C : 0), row-major, on ctx
// (kernel::Gemm: OpenBLAS on the CPU pool, cuBLAS on a GPU). A is m x k
// after op, B is k x n after op. No-op for kNull.
void Gemm(Context ctx, OpReq req, bool trans_a, bool trans_b, int64_t m, int64_t n,
          int64_t k, float alpha, const float* a, const float* b, float* c);

// out = f(in) element-wise with req.
template <typename F>
void MapStore(OpReq req, const float* in, float* out, int64_t n, F f) {
  if (req == OpReq::kWrite) {
    for (int64_t i = 0; i < n; ++i) out[i] = f(in[i]);
  } else if (req == OpReq::kAdd) {
    for (int64_t i = 0; i < n; ++i) out[i] += f(in[i]);
  }
}

// Shape inference for operators whose inputs and outputs all share one
// shape.
absl::Status SameShapeInfer(const ParsedParams&, ShapeList* in, ShapeList* out,
                            ShapeList* aux);

// For operators whose kernels index through kernel::BroadcastIndex
// (broadcasts, reductions over axes, transpose, Dropout's axes): an error
// at inference when `ndim` exceeds what the index holds, not at the first
// forward.
absl::Status AtMostKernelDims(int ndim, const char* op);

// OpDef::blocked of element-wise operators of SameShapeInfer: every input
// and output, in one layout, which the kernels then need not know.
BlockedIo ElementWiseBlocked(const ParsedParams&, const ShapeList& in, const ShapeList& out);

}  // namespace mx::ops

#endif  // MX_GRAPH_OPS_OP_UTIL_H_
