// LeakyReLU, as MXNet's, for act_type
//   leaky: x > 0 ? x : slope * x
//   elu:   x > 0 ? x : slope * (e^x - 1)
//   selu:  lambda * (x > 0 ? x : alpha * (e^x - 1)), MXNet's constants
//   gelu:  0.5 * x * (1 + erf(x / sqrt(2)))
//   prelu: x > 0 ? x : gamma[c] * x, with a learnt gamma per channel (axis
//          1) or a single one (shape (1,)); takes a second argument, gamma.
// rrelu (a random slope in training) is not supported: shape inference
// reports it as Unimplemented.
#include <string>

#include "graph/ops/op_util.h"
#include "ndarray/launch.h"
#include "ndarray/nn_kernels.h"

namespace mx::ops {
namespace {

absl::Status Infer(const ParsedParams& p, ShapeList* in, ShapeList* out,
                   ShapeList*) {
  const std::string& act = p.GetString("act_type");
  if (act == "rrelu") {
    return absl::UnimplementedError(
        "LeakyReLU act_type=rrelu (random slopes) is not supported yet");
  }
  ShapeList data{(*in)[0]};
  MX_RETURN_IF_ERROR(MergeShape(&data, 0, (*out)[0], "input data"));
  MX_RETURN_IF_ERROR(MergeShape(in, 0, data[0], "input data"));
  MX_RETURN_IF_ERROR(MergeShape(out, 0, data[0], "output"));
  if (act != "prelu" || data[0].ndim() == 0) return absl::OkStatus();
  // gamma: one slope per channel, or one for all (Gluon's PReLU default).
  const Shape& gamma = (*in)[1];
  if (gamma.ndim() == 1 && gamma[0] == 1) return absl::OkStatus();
  const int64_t channels = data[0].ndim() >= 2 ? data[0][1] : 1;
  return MergeShape(in, 1, Shape{channels}, "input gamma");
}

// Number of channels of prelu's gamma and the stride of axis 1.
void PreluDims(const Shape& data, const Shape& gamma, int64_t* channels,
               int64_t* inner) {
  *channels = gamma.Size();
  *inner = 1;
  for (int d = 2; d < data.ndim(); ++d) *inner *= data[d];
}

// Calls f(A()) with the functor of ndarray/nn_kernels.h that act (not
// prelu) names.
template <typename F>
void Dispatch(const std::string& act, F f) {
  if (act == "leaky") return f(kernel::op::LeakyAct());
  if (act == "elu") return f(kernel::op::EluAct());
  if (act == "selu") return f(kernel::op::SeluAct());
  return f(kernel::op::GeluAct());  // the only other type Infer admits
}

void Forward(const OpContext& ctx, const ParsedParams& p,
             const std::vector<TBlob>& in, const std::vector<OpReq>& req,
             const std::vector<TBlob>& out, const std::vector<TBlob>&) {
  if (req[0] == OpReq::kNull) return;
  const std::string& act = p.GetString("act_type");
  const int64_t n = out[0].Size();
  const bool add = req[0] == OpReq::kAdd;
  if (act == "prelu") {
    int64_t channels, inner;
    PreluDims(in[0].shape, in[1].shape, &channels, &inner);
    kernel::Launch<kernel::PreluKernel>(
        "LeakyReLU", ctx.ctx, n,
        {out[0].data, in[0].data, in[0].data, in[1].data, channels, inner, add});
    return;
  }
  Dispatch(act, [&](auto a) {
    kernel::Launch<kernel::LeakyKernel<decltype(a)>>(
        "LeakyReLU", ctx.ctx, n, {out[0].data, in[0].data, p.GetFloat("slope"), add});
  });
}

void Backward(const OpContext& ctx, const ParsedParams& p,
              const std::vector<TBlob>& out_grad, const std::vector<TBlob>& in,
              const std::vector<TBlob>& out, const std::vector<OpReq>& req,
              const std::vector<TBlob>& in_grad, const std::vector<TBlob>&) {
  const std::string& act = p.GetString("act_type");
  const int64_t n = out_grad[0].Size();
  if (act == "prelu") {
    int64_t channels, inner;
    PreluDims(in[0].shape, in[1].shape, &channels, &inner);
    if (req[0] != OpReq::kNull) {
      kernel::Launch<kernel::PreluKernel>(
          "LeakyReLU", ctx.ctx, n,
          {in_grad[0].data, out_grad[0].data, in[0].data, in[1].data, channels, inner,
           req[0] == OpReq::kAdd});
    }
    if (req[1] != OpReq::kNull) {
      kernel::Launch<kernel::PreluGammaGradKernel>(
          "LeakyReLU", ctx.ctx, channels,
          {in_grad[1].data, out_grad[0].data, in[0].data, n, channels, inner,
           req[1] == OpReq::kAdd});
    }
    return;
  }
  if (req[0] == OpReq::kNull) return;
  Dispatch(act, [&](auto a) {
    kernel::Launch<kernel::LeakyGradKernel<decltype(a)>>(
        "LeakyReLU", ctx.ctx, n,
        {in_grad[0].data, out_grad[0].data, in[0].data, out[0].data, p.GetFloat("slope"),
         req[0] == OpReq::kAdd});
  });
}

OpDef Make() {
  OpDef op;
  op.name = "LeakyReLU";
  op.params = {{"act_type", ParamSpec::Type::kString, "leaky", false,
                {"elu", "gelu", "leaky", "prelu", "rrelu", "selu"}},
               {"slope", ParamSpec::Type::kFloat, "0.25"},
               {"lower_bound", ParamSpec::Type::kFloat, "0.125"},
               {"upper_bound", ParamSpec::Type::kFloat, "0.334"}};
  op.arguments = [](const ParsedParams& p) {
    return p.GetString("act_type") == "prelu"
               ? std::vector<std::string>{"data", "gamma"}
               : std::vector<std::string>{"data"};
  };
  op.infer_shape = Infer;
  op.forward = Forward;
  op.backward = Backward;
  // Element-wise: the output may overwrite the input whenever the input is
  // not needed later (the executor checks; gelu and prelu read it in
  // backward).
  op.inplace = {{0, 0}};
  op.gpu = true;
  return op;
}

MX_REGISTER_OP(Make());

}  // namespace
}  // namespace mx::ops
