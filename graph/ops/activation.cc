// Activation (relu, sigmoid, tanh, softrelu, softsign). The gradient is computed from
// the output alone, so the output may overwrite the input.
#include <string>

#include "graph/ops/op_util.h"
#include "ndarray/launch.h"
#include "ndarray/nn_kernels.h"

namespace mx::ops {
namespace {

// Calls f(A()) with the activation functor of ndarray/nn_kernels.h that
// act names: the type is dispatched once per call, and each kernel is
// compiled for one function.
template <typename F>
void Dispatch(const std::string& act, F f) {
  if (act == "relu") return f(kernel::op::ReluAct());
  if (act == "sigmoid") return f(kernel::op::SigmoidAct());
  if (act == "tanh") return f(kernel::op::TanhAct());
  if (act == "softsign") return f(kernel::op::SoftSignAct());
  return f(kernel::op::SoftReluAct());  // the only other value ParamSpec admits
}

OpDef Make() {
  OpDef op;
  op.name = "Activation";
  op.params = {{"act_type",
                ParamSpec::Type::kString,
                "",
                true,
                {"relu", "sigmoid", "tanh", "softrelu", "softsign"}}};
  op.infer_shape = SameShapeInfer;
  op.blocked = ElementWiseBlocked;
  op.inplace = {{0, 0}};
  op.backward_uses_inputs = false;
  op.gpu = true;
  op.forward = [](const OpContext& ctx, const ParsedParams& p,
                  const std::vector<TBlob>& in, const std::vector<OpReq>& req,
                  const std::vector<TBlob>& out, const std::vector<TBlob>&) {
    if (req[0] == OpReq::kNull) return;
    Dispatch(p.GetString("act_type"), [&](auto act) {
      using K = kernel::ActivationKernel<decltype(act)>;
      kernel::Launch<K>("Activation", ctx.ctx, out[0].Size(),
                        {out[0].data, in[0].data, req[0] == OpReq::kAdd});
    });
  };
  op.backward = [](const OpContext& ctx, const ParsedParams& p,
                   const std::vector<TBlob>& out_grad, const std::vector<TBlob>&,
                   const std::vector<TBlob>& out, const std::vector<OpReq>& req,
                   const std::vector<TBlob>& in_grad, const std::vector<TBlob>&) {
    if (req[0] == OpReq::kNull) return;
    Dispatch(p.GetString("act_type"), [&](auto act) {
      using K = kernel::ActivationGradKernel<decltype(act)>;
      kernel::Launch<K>("Activation", ctx.ctx, out[0].Size(),
                        {in_grad[0].data, out_grad[0].data, out[0].data,
                         req[0] == OpReq::kAdd});
    });
  };
  return op;
}

MX_REGISTER_OP(Make());

}  // namespace
}  // namespace mx::ops
