// Element-wise arithmetic between two symbols of equal shape, and between a
// symbol and a scalar.
#include <cmath>

#include "graph/ops/op_util.h"

namespace mx::ops {
namespace {

enum class Arith { kAdd, kSub, kMul, kDiv };

OpDef MakeBinary(const char* name, const char* hint, Arith kind) {
  OpDef op;
  op.name = name;
  op.name_hint = hint;
  op.arguments = Names({"lhs", "rhs"});
  op.required_inputs = {"lhs", "rhs"};
  op.infer_shape = SameShapeInfer;
  op.inplace = {{0, 0}, {1, 0}};
  op.backward_uses_outputs = false;
  op.backward_uses_inputs = kind == Arith::kMul || kind == Arith::kDiv;
  op.forward = [kind](const OpContext&, const ParsedParams&,
                      const std::vector<TBlob>& in, const std::vector<OpReq>& req,
                      const std::vector<TBlob>& out, const std::vector<TBlob>&) {
    const float* a = in[0].data;
    const float* b = in[1].data;
    float* o = out[0].data;
    const int64_t n = out[0].Size();
    for (int64_t i = 0; i < n; ++i) {
      float v = kind == Arith::kAdd   ? a[i] + b[i]
                : kind == Arith::kSub ? a[i] - b[i]
                : kind == Arith::kMul ? a[i] * b[i]
                                      : a[i] / b[i];
      Store(req[0], o + i, v);
    }
  };
  op.backward = [kind](const OpContext&, const ParsedParams&,
                       const std::vector<TBlob>& out_grad,
                       const std::vector<TBlob>& in, const std::vector<TBlob>&,
                       const std::vector<OpReq>& req,
                       const std::vector<TBlob>& in_grad,
                       const std::vector<TBlob>&) {
    const float* g = out_grad[0].data;
    const int64_t n = out_grad[0].Size();
    for (int64_t i = 0; i < n; ++i) {
      float ga, gb;
      switch (kind) {
        case Arith::kAdd: ga = g[i]; gb = g[i]; break;
        case Arith::kSub: ga = g[i]; gb = -g[i]; break;
        case Arith::kMul: ga = g[i] * in[1].data[i]; gb = g[i] * in[0].data[i]; break;
        default: {
          const float b = in[1].data[i];
          ga = g[i] / b;
          gb = -g[i] * in[0].data[i] / (b * b);
        }
      }
      if (req[0] != OpReq::kNull) Store(req[0], in_grad[0].data + i, ga);
      if (req[1] != OpReq::kNull) Store(req[1], in_grad[1].data + i, gb);
    }
  };
  return op;
}

enum class ScalarKind { kPlus, kMinus, kRMinus, kMul, kDiv, kRDiv };

OpDef MakeScalar(const char* name, const char* hint, ScalarKind kind) {
  OpDef op;
  op.name = name;
  op.name_hint = hint;
  op.params = {{"scalar", ParamSpec::Type::kFloat, "1"}};
  op.infer_shape = SameShapeInfer;
  op.inplace = {{0, 0}};
  op.backward_uses_outputs = false;
  op.backward_uses_inputs = kind == ScalarKind::kRDiv;
  op.forward = [kind](const OpContext&, const ParsedParams& p,
                      const std::vector<TBlob>& in, const std::vector<OpReq>& req,
                      const std::vector<TBlob>& out, const std::vector<TBlob>&) {
    const float s = p.GetFloat("scalar");
    MapStore(req[0], in[0].data, out[0].data, out[0].Size(), [kind, s](float x) {
      switch (kind) {
        case ScalarKind::kPlus: return x + s;
        case ScalarKind::kMinus: return x - s;
        case ScalarKind::kRMinus: return s - x;
        case ScalarKind::kMul: return x * s;
        case ScalarKind::kDiv: return x / s;
        default: return s / x;
      }
    });
  };
  op.backward = [kind](const OpContext&, const ParsedParams& p,
                       const std::vector<TBlob>& out_grad,
                       const std::vector<TBlob>& in, const std::vector<TBlob>&,
                       const std::vector<OpReq>& req,
                       const std::vector<TBlob>& in_grad,
                       const std::vector<TBlob>&) {
    const float s = p.GetFloat("scalar");
    const float* g = out_grad[0].data;
    float* gi = in_grad[0].data;
    const int64_t n = out_grad[0].Size();
    for (int64_t i = 0; i < n; ++i) {
      float v;
      switch (kind) {
        case ScalarKind::kPlus:
        case ScalarKind::kMinus: v = g[i]; break;
        case ScalarKind::kRMinus: v = -g[i]; break;
        case ScalarKind::kMul: v = g[i] * s; break;
        case ScalarKind::kDiv: v = g[i] / s; break;
        default: {
          const float x = in[0].data[i];
          v = -g[i] * s / (x * x);
        }
      }
      Store(req[0], gi + i, v);
    }
  };
  return op;
}

MX_REGISTER_OP(MakeBinary("elemwise_add", "_plus", Arith::kAdd));
MX_REGISTER_OP(MakeBinary("elemwise_sub", "_minus", Arith::kSub));
MX_REGISTER_OP(MakeBinary("elemwise_mul", "_mul", Arith::kMul));
MX_REGISTER_OP(MakeBinary("elemwise_div", "_div", Arith::kDiv));
MX_REGISTER_OP(MakeScalar("_plus_scalar", "_plusscalar", ScalarKind::kPlus));
MX_REGISTER_OP(MakeScalar("_minus_scalar", "_minusscalar", ScalarKind::kMinus));
MX_REGISTER_OP(MakeScalar("_rminus_scalar", "_rminusscalar", ScalarKind::kRMinus));
MX_REGISTER_OP(MakeScalar("_mul_scalar", "_mulscalar", ScalarKind::kMul));
MX_REGISTER_OP(MakeScalar("_div_scalar", "_divscalar", ScalarKind::kDiv));
MX_REGISTER_OP(MakeScalar("_rdiv_scalar", "_rdivscalar", ScalarKind::kRDiv));

}  // namespace
}  // namespace mx::ops
