// Dropout, as MXNet's: in training (or always, with mode="always") every
// element is kept with probability 1 - p and scaled by 1 / (1 - p), or
// zeroed; otherwise the operator is the identity. `axes` shares one draw
// along the given axes (variational dropout), as MXNet's does.
//
// The mask is a second, hidden output (as in MXNet): forward writes the
// factor of every element (1 / (1 - p) or 0) there and backward multiplies
// the gradient by it.
#include <cstdint>
#include <algorithm>
#include <vector>

#include "graph/ops/op_util.h"
#include "ndarray/launch.h"
#include "ndarray/nn_kernels.h"

namespace mx::ops {
namespace {

// The index that maps an element of data to its element of the mask,
// which has data's shape with the shared axes set to 1.
kernel::BroadcastIndex MaskIndex(const ParsedParams& p, const Shape& data) {
  Shape mask = data;
  for (int64_t axis : p.GetShape("axes")) {
    mask[static_cast<int>(axis < 0 ? axis + data.ndim() : axis)] = 1;
  }
  return kernel::MakeBroadcastIndex("Dropout", data, mask, mask);
}

absl::Status Infer(const ParsedParams& p, ShapeList* in, ShapeList* out,
                   ShapeList* aux) {
  const float prob = p.GetFloat("p");
  if (!(prob >= 0 && prob <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("p=", prob, " is not a probability in [0, 1]"));
  }
  MX_RETURN_IF_ERROR(SameShapeInfer(p, in, out, aux));
  const Shape& data = (*in)[0];
  MX_RETURN_IF_ERROR(AtMostKernelDims(data.ndim(), "Dropout"));
  if (data.ndim() == 0) return absl::OkStatus();
  for (int64_t axis : p.GetShape("axes")) {
    if (axis < -data.ndim() || axis >= data.ndim()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "axes: axis ", axis, " is out of range for data of shape ",
          data.ToString()));
    }
  }
  return absl::OkStatus();
}

void Forward(const OpContext& ctx, const ParsedParams& p,
             const std::vector<TBlob>& in, const std::vector<OpReq>& req,
             const std::vector<TBlob>& out, const std::vector<TBlob>&) {
  const bool active = (ctx.is_train || p.GetString("mode") == "always") && p.GetFloat("p") > 0;
  const int64_t n = out[0].Size();
  const bool add = req[0] == OpReq::kAdd;
  if (!active) {
    if (req[0] != OpReq::kNull) {
      kernel::Launch<kernel::CopyKernel>("Dropout", ctx.ctx, n, {out[0].data, in[0].data, add});
    }
    kernel::Launch<kernel::FillKernel>("Dropout", ctx.ctx, n, {out[1].data, 1.0f});
    return;
  }
  const float keep = 1.0f - p.GetFloat("p");
  kernel::DropoutKernel::Params params{out[0].data, out[1].data, in[0].data,
                                       MaskIndex(p, in[0].shape), ctx.seed, keep,
                                       keep > 0 ? 1.0f / keep : 0.0f, add};
  kernel::Launch<kernel::DropoutKernel>("Dropout", ctx.ctx, n, params);
}

void Backward(const OpContext& ctx, const ParsedParams&,
              const std::vector<TBlob>& out_grad, const std::vector<TBlob>&,
              const std::vector<TBlob>& out, const std::vector<OpReq>& req,
              const std::vector<TBlob>& in_grad, const std::vector<TBlob>&) {
  if (req[0] == OpReq::kNull) return;
  kernel::Launch<kernel::BinaryPutKernel<kernel::op::Mul>>(
      "Dropout", ctx.ctx, out_grad[0].Size(),
      {in_grad[0].data, out_grad[0].data, out[1].data, 0.0f, req[0] == OpReq::kAdd});
}

OpDef Make() {
  OpDef op;
  op.name = "Dropout";
  op.params = {{"p", ParamSpec::Type::kFloat, "0.5"},
               {"mode", ParamSpec::Type::kString, "training", false,
                {"training", "always"}},
               {"axes", ParamSpec::Type::kShape, "()"},
               // Accepted for MXNet symbol files; mx has no cuDNN dropout.
               {"cudnn_off", ParamSpec::Type::kBool, "False"}};
  op.outputs = Names({"output", "mask"});
  op.num_visible_outputs = [](const ParsedParams&) { return 1; };
  op.infer_shape = Infer;
  op.forward = Forward;
  op.backward = Backward;
  op.backward_uses_inputs = false;
  op.backward_uses_outputs = OpDef::OutputUse::kAllButFirst;  // the mask
  op.gpu = true;
  return op;
}

MX_REGISTER_OP(Make());

}  // namespace
}  // namespace mx::ops
