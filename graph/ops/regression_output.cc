// Regression losses and SoftmaxActivation, as MXNet's.
//
// LinearRegressionOutput, LogisticRegressionOutput, MAERegressionOutput:
// forward is the identity, the sigmoid and the identity; backward ignores
// the head gradient (they are losses) and gives
//   grad_scale / num_output * (out - label)        (linear, logistic)
//   grad_scale / num_output * sign(out - label)    (MAE; sign(0) = -1)
// with num_output = label.Size() / label.shape[0], the outputs per sample:
// the gradients of the squared error / 2, the cross-entropy of a sigmoid
// and the absolute error, averaged over each sample's outputs. The label
// has data's shape, or (N,) for data (N, 1); it gets no gradient.
//
// SoftmaxActivation: softmax over the last axis (mode=instance) or over
// axis 1 at every position (mode=channel, data of 3 or more dimensions),
// with its full Jacobian in backward: dx = y * (g - sum(g * y)).
#include <algorithm>
#include <vector>

#include "graph/ops/op_util.h"
#include "ndarray/launch.h"
#include "ndarray/nn_kernels.h"

namespace mx::ops {
namespace {

enum class Regression { kLinear, kLogistic, kMAE };

absl::Status RegressionInfer(const ParsedParams&, ShapeList* in,
                             ShapeList* out, ShapeList*) {
  MX_RETURN_IF_ERROR(MergeShape(in, 0, (*out)[0], "input data"));
  const Shape& data = (*in)[0];
  if (data.ndim() == 0) return absl::OkStatus();
  Shape& label = (*in)[1];
  if (label.ndim() == 0) {
    label = data.ndim() == 2 && data[1] == 1 ? Shape{data[0]} : data;
  } else if (IsKnown(label) && IsKnown(data) &&
             (label[0] != data[0] || label.Size() != data.Size())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "input label has shape ", label.ToString(), " but data has shape ",
        data.ToString(), " (the label needs the batch size and size of data)"));
  }
  return MergeShape(out, 0, data, "output");
}

const char* name_of(Regression kind) {
  switch (kind) {
    case Regression::kLinear: return "LinearRegressionOutput";
    case Regression::kLogistic: return "LogisticRegressionOutput";
    case Regression::kMAE: return "MAERegressionOutput";
  }
  return "";
}

OpDef MakeRegression(Regression kind) {
  const char* name = name_of(kind);
  OpDef op;
  op.name = name;
  op.params = {{"grad_scale", ParamSpec::Type::kFloat, "1"}};
  op.arguments = Names({"data", "label"});
  op.infer_shape = RegressionInfer;
  op.is_loss = true;
  op.inplace = {{0, 0}};
  op.gpu = true;
  op.forward = [kind](const OpContext& ctx, const ParsedParams&,
                      const std::vector<TBlob>& in, const std::vector<OpReq>& req,
                      const std::vector<TBlob>& out, const std::vector<TBlob>&) {
    if (req[0] == OpReq::kNull) return;
    const bool add = req[0] == OpReq::kAdd;
    if (kind == Regression::kLogistic) {
      kernel::Launch<kernel::ActivationKernel<kernel::op::SigmoidAct>>(
          name_of(kind), ctx.ctx, out[0].Size(), {out[0].data, in[0].data, add});
    } else {
      kernel::Launch<kernel::CopyKernel>(name_of(kind), ctx.ctx, out[0].Size(),
                                         {out[0].data, in[0].data, add});
    }
  };
  op.backward = [kind](const OpContext& ctx, const ParsedParams& p,
                       const std::vector<TBlob>&, const std::vector<TBlob>& in,
                       const std::vector<TBlob>& out, const std::vector<OpReq>& req,
                       const std::vector<TBlob>& in_grad,
                       const std::vector<TBlob>&) {
    const Shape& label_shape = in[1].shape;
    const int64_t batch = label_shape.ndim() > 0 ? label_shape[0] : 1;
    const float num_output =
        static_cast<float>(label_shape.Size() / std::max<int64_t>(batch, 1));
    const float scale = p.GetFloat("grad_scale") / num_output;
    if (req[0] != OpReq::kNull) {
      kernel::Launch<kernel::RegressionGradKernel>(
          name_of(kind), ctx.ctx, out[0].Size(),
          {in_grad[0].data, out[0].data, in[1].data, scale, kind == Regression::kMAE,
           req[0] == OpReq::kAdd});
    }
    if (req[1] == OpReq::kWrite) {
      kernel::Launch<kernel::FillKernel>(name_of(kind), ctx.ctx, in[1].Size(),
                                         {in_grad[1].data, 0.0f});
    }
  };
  return op;
}

MX_REGISTER_OP(MakeRegression(Regression::kLinear));
MX_REGISTER_OP(MakeRegression(Regression::kLogistic));
MX_REGISTER_OP(MakeRegression(Regression::kMAE));

// The softmax axis: data viewed as (outer, classes, inner).
struct SoftmaxLayout {
  int64_t outer = 1, classes = 1, inner = 1;
};

SoftmaxLayout GetSoftmaxLayout(const ParsedParams& p, const Shape& data) {
  SoftmaxLayout l;
  if (p.GetString("mode") == "instance") {
    l.classes = data.ndim() > 0 ? data[data.ndim() - 1] : 1;
    l.outer = data.Size() / std::max<int64_t>(l.classes, 1);
  } else {
    l.outer = data[0];
    l.classes = data[1];
    l.inner = data.Size() / std::max<int64_t>(l.outer * l.classes, 1);
  }
  return l;
}

absl::Status SoftmaxActivationInfer(const ParsedParams& p, ShapeList* in,
                                    ShapeList* out, ShapeList* aux) {
  MX_RETURN_IF_ERROR(SameShapeInfer(p, in, out, aux));
  const Shape& data = (*in)[0];
  if (p.GetString("mode") == "channel" && data.ndim() > 0 && data.ndim() < 3) {
    return absl::InvalidArgumentError(absl::StrCat(
        "mode=channel needs data with at least 3 dimensions, got ",
        data.ToString()));
  }
  return absl::OkStatus();
}

OpDef MakeSoftmaxActivation() {
  OpDef op;
  op.name = "SoftmaxActivation";
  op.params = {{"mode", ParamSpec::Type::kString, "instance", false,
                {"instance", "channel"}}};
  op.infer_shape = SoftmaxActivationInfer;
  op.inplace = {{0, 0}};
  op.backward_uses_inputs = false;
  op.gpu = true;
  op.forward = [](const OpContext& ctx, const ParsedParams& p,
                  const std::vector<TBlob>& in, const std::vector<OpReq>& req,
                  const std::vector<TBlob>& out, const std::vector<TBlob>&) {
    if (req[0] == OpReq::kNull) return;
    const SoftmaxLayout l = GetSoftmaxLayout(p, in[0].shape);
    kernel::Launch<kernel::SoftmaxStridedKernel>(
        "SoftmaxActivation", ctx.ctx, l.outer * l.inner,
        {out[0].data, in[0].data, l.classes, l.inner, req[0] == OpReq::kAdd});
  };
  op.backward = [](const OpContext& ctx, const ParsedParams& p,
                   const std::vector<TBlob>& out_grad, const std::vector<TBlob>&,
                   const std::vector<TBlob>& out, const std::vector<OpReq>& req,
                   const std::vector<TBlob>& in_grad, const std::vector<TBlob>&) {
    if (req[0] == OpReq::kNull) return;
    const SoftmaxLayout l = GetSoftmaxLayout(p, out[0].shape);
    kernel::Launch<kernel::SoftmaxStridedGradKernel>(
        "SoftmaxActivation", ctx.ctx, l.outer * l.inner,
        {in_grad[0].data, out_grad[0].data, out[0].data, l.classes, l.inner,
         req[0] == OpReq::kAdd});
  };
  return op;
}

MX_REGISTER_OP(MakeSoftmaxActivation());

}  // namespace
}  // namespace mx::ops
