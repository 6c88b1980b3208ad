// Element-wise arithmetic between two symbols of equal shape, and between a
// symbol and a scalar. The arithmetic and its derivatives are the functors
// of ndarray/kernel.h, which NDArray arithmetic uses too.
#include "graph/ops/op_util.h"
#include "ndarray/kernel.h"

namespace mx::ops {
namespace {

namespace op = kernel::op;

template <typename F>
OpDef MakeBinary(const char* name, const char* hint) {
  OpDef op;
  op.name = name;
  op.name_hint = hint;
  op.arguments = Names({"lhs", "rhs"});
  op.required_inputs = {"lhs", "rhs"};
  op.infer_shape = SameShapeInfer;
  op.inplace = {{0, 0}, {1, 0}};
  op.backward_uses_outputs = false;
  op.backward_uses_inputs = F::kGradUsesInputs;
  op.forward = [](const OpContext&, const ParsedParams&, const std::vector<TBlob>& in,
                  const std::vector<OpReq>& req, const std::vector<TBlob>& out,
                  const std::vector<TBlob>&) {
    const int64_t n = out[0].Size();
    if (req[0] == OpReq::kWrite) {
      kernel::BinaryKernel<F>::MapRange(0, n, {out[0].data, in[0].data, in[1].data});
      return;
    }
    for (int64_t i = 0; i < n; ++i) {
      Store(req[0], out[0].data + i, F::Apply(in[0].data[i], in[1].data[i]));
    }
  };
  op.backward = [](const OpContext&, const ParsedParams&, const std::vector<TBlob>& out_grad,
                   const std::vector<TBlob>& in, const std::vector<TBlob>&,
                   const std::vector<OpReq>& req, const std::vector<TBlob>& in_grad,
                   const std::vector<TBlob>&) {
    const float* g = out_grad[0].data;
    const int64_t n = out_grad[0].Size();
    // Inputs are not kept when the derivatives do not read them.
    auto a = [&](int64_t i) { return F::kGradUsesInputs ? in[0].data[i] : 0.0f; };
    auto b = [&](int64_t i) { return F::kGradUsesInputs ? in[1].data[i] : 0.0f; };
    for (int64_t i = 0; i < n; ++i) {
      Store(req[0], in_grad[0].data + i, F::GradA(g[i], a(i), b(i)));
      Store(req[1], in_grad[1].data + i, F::GradB(g[i], a(i), b(i)));
    }
  };
  return op;
}

// x op scalar, with F(x, scalar); F::GradA is the derivative in x.
template <typename F>
OpDef MakeScalar(const char* name, const char* hint) {
  OpDef op;
  op.name = name;
  op.name_hint = hint;
  op.params = {{"scalar", ParamSpec::Type::kFloat, "1"}};
  op.infer_shape = SameShapeInfer;
  op.inplace = {{0, 0}};
  op.backward_uses_outputs = false;
  op.backward_uses_inputs = F::kGradUsesInputs;
  op.forward = [](const OpContext&, const ParsedParams& p, const std::vector<TBlob>& in,
                  const std::vector<OpReq>& req, const std::vector<TBlob>& out,
                  const std::vector<TBlob>&) {
    const float s = p.GetFloat("scalar");
    MapStore(req[0], in[0].data, out[0].data, out[0].Size(),
             [s](float x) { return F::Apply(x, s); });
  };
  op.backward = [](const OpContext&, const ParsedParams& p, const std::vector<TBlob>& out_grad,
                   const std::vector<TBlob>& in, const std::vector<TBlob>&,
                   const std::vector<OpReq>& req, const std::vector<TBlob>& in_grad,
                   const std::vector<TBlob>&) {
    const float s = p.GetFloat("scalar");
    const float* g = out_grad[0].data;
    const int64_t n = out_grad[0].Size();
    for (int64_t i = 0; i < n; ++i) {
      const float x = F::kGradUsesInputs ? in[0].data[i] : 0.0f;
      Store(req[0], in_grad[0].data + i, F::GradA(g[i], x, s));
    }
  };
  return op;
}

MX_REGISTER_OP(MakeBinary<op::Add>("elemwise_add", "_plus"));
MX_REGISTER_OP(MakeBinary<op::Sub>("elemwise_sub", "_minus"));
MX_REGISTER_OP(MakeBinary<op::Mul>("elemwise_mul", "_mul"));
MX_REGISTER_OP(MakeBinary<op::Div>("elemwise_div", "_div"));
MX_REGISTER_OP(MakeScalar<op::Add>("_plus_scalar", "_plusscalar"));
MX_REGISTER_OP(MakeScalar<op::Sub>("_minus_scalar", "_minusscalar"));
MX_REGISTER_OP(MakeScalar<op::RSub>("_rminus_scalar", "_rminusscalar"));
MX_REGISTER_OP(MakeScalar<op::Mul>("_mul_scalar", "_mulscalar"));
MX_REGISTER_OP(MakeScalar<op::Div>("_div_scalar", "_divscalar"));
MX_REGISTER_OP(MakeScalar<op::RDiv>("_rdiv_scalar", "_rdivscalar"));

}  // namespace
}  // namespace mx::ops
