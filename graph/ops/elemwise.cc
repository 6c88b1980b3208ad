// Element-wise arithmetic between two symbols of equal shape, and between a
// symbol and a scalar, on any context. The arithmetic and its derivatives
// are the functors of ndarray/kernel.h, which NDArray arithmetic uses too.
#include "graph/ops/op_util.h"
#include "ndarray/launch.h"
#include "ndarray/nn_kernels.h"

namespace mx::ops {
namespace {

namespace op = kernel::op;

// The inputs F's derivatives read, or null when they read none (the
// executor then does not keep them).
template <typename F>
const float* IfUsed(const TBlob& blob) {
  return F::kGradUsesInputs ? blob.data : nullptr;
}

float* IfWanted(OpReq req, const TBlob& grad) { return req == OpReq::kNull ? nullptr : grad.data; }

template <typename F>
OpDef MakeBinary(const char* name, const char* hint) {
  OpDef op;
  op.name = name;
  op.name_hint = hint;
  op.arguments = Names({"lhs", "rhs"});
  op.infer_shape = SameShapeInfer;
  op.blocked = ElementWiseBlocked;
  op.inplace = {{0, 0}, {1, 0}};
  op.backward_uses_outputs = OpDef::OutputUse::kNone;
  op.backward_uses_inputs = F::kGradUsesInputs;
  op.gpu = true;
  op.forward = [name](const OpContext& ctx, const ParsedParams&, const std::vector<TBlob>& in,
                      const std::vector<OpReq>& req, const std::vector<TBlob>& out,
                      const std::vector<TBlob>&) {
    if (req[0] == OpReq::kNull) return;
    const int64_t n = out[0].Size();
    if (req[0] == OpReq::kWrite) {
      kernel::Launch<kernel::BinaryKernel<F>>(name, ctx.ctx, n,
                                              {out[0].data, in[0].data, in[1].data});
      return;
    }
    kernel::Launch<kernel::BinaryPutKernel<F>>(name, ctx.ctx, n,
                                               {out[0].data, in[0].data, in[1].data, 0, true});
  };
  op.backward = [name](const OpContext& ctx, const ParsedParams&,
                       const std::vector<TBlob>& out_grad, const std::vector<TBlob>& in,
                       const std::vector<TBlob>&, const std::vector<OpReq>& req,
                       const std::vector<TBlob>& in_grad, const std::vector<TBlob>&) {
    kernel::Launch<kernel::BinaryGradKernel<F>>(
        name, ctx.ctx, out_grad[0].Size(),
        {IfWanted(req[0], in_grad[0]), IfWanted(req[1], in_grad[1]), out_grad[0].data,
         IfUsed<F>(in[0]), IfUsed<F>(in[1]), 0, req[0] == OpReq::kAdd, req[1] == OpReq::kAdd});
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
  op.blocked = ElementWiseBlocked;
  op.inplace = {{0, 0}};
  op.backward_uses_outputs = OpDef::OutputUse::kNone;
  op.backward_uses_inputs = F::kGradAUsesA;
  op.gpu = true;
  op.forward = [name](const OpContext& ctx, const ParsedParams& p, const std::vector<TBlob>& in,
                      const std::vector<OpReq>& req, const std::vector<TBlob>& out,
                      const std::vector<TBlob>&) {
    if (req[0] == OpReq::kNull) return;
    const int64_t n = out[0].Size();
    const float scalar = p.GetFloat("scalar");
    if (req[0] == OpReq::kWrite) {
      kernel::Launch<kernel::ScalarKernel<F>>(name, ctx.ctx, n, {out[0].data, in[0].data, scalar});
      return;
    }
    kernel::Launch<kernel::BinaryPutKernel<F>>(name, ctx.ctx, n,
                                               {out[0].data, in[0].data, nullptr, scalar, true});
  };
  op.backward = [name](const OpContext& ctx, const ParsedParams& p,
                       const std::vector<TBlob>& out_grad, const std::vector<TBlob>& in,
                       const std::vector<TBlob>&, const std::vector<OpReq>& req,
                       const std::vector<TBlob>& in_grad, const std::vector<TBlob>&) {
    kernel::Launch<kernel::BinaryGradKernel<F>>(
        name, ctx.ctx, out_grad[0].Size(),
        {IfWanted(req[0], in_grad[0]), nullptr, out_grad[0].data,
         F::kGradAUsesA ? in[0].data : nullptr, nullptr,
         p.GetFloat("scalar"), req[0] == OpReq::kAdd, false});
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
