// SoftmaxOutput: softmax in forward; in backward the gradient of the
// cross-entropy loss against integer labels, (p - onehot(label)) *
// grad_scale / normalization, as MXNet computes it. The head gradient is
// not used (it is a loss).
#include <algorithm>
#include <string>

#include "graph/ops/op_util.h"
#include "ndarray/launch.h"
#include "ndarray/nn_kernels.h"

namespace mx::ops {
namespace {

// (rows, classes) of the softmax: over the last axis of a 2-D view, with
// data (N, ...) flattened to (N, rest).
void Dims(const Shape& data, int64_t* rows, int64_t* classes) {
  *rows = data.ndim() > 0 ? data[0] : 0;
  *classes = data.RowSize();
}

absl::Status Infer(const ParsedParams& p, ShapeList* in, ShapeList* out,
                   ShapeList*) {
  for (const char* flag : {"multi_output", "preserve_shape", "out_grad"}) {
    if (p.GetBool(flag)) {
      return absl::UnimplementedError(
          absl::StrCat("parameter ", flag, "=True is not supported yet"));
    }
  }
  if (p.GetFloat("smooth_alpha") != 0) {
    return absl::UnimplementedError("label smoothing (smooth_alpha) is not supported yet");
  }
  const Shape& data = (*in)[0];
  if (data.ndim() == 0) return absl::OkStatus();
  MX_RETURN_IF_ERROR(MergeShape(in, 1, Shape{data[0]}, "input label"));
  return MergeShape(out, 0, data, "output");
}

void Forward(const OpContext& ctx, const ParsedParams&, const std::vector<TBlob>& in,
             const std::vector<OpReq>& req, const std::vector<TBlob>& out,
             const std::vector<TBlob>&) {
  if (req[0] == OpReq::kNull) return;
  int64_t rows, classes;
  Dims(in[0].shape, &rows, &classes);
  kernel::Launch<kernel::SoftmaxRowsKernel>("SoftmaxOutput", ctx.ctx, rows,
                                            {out[0].data, in[0].data, classes});
}

// Labels get no gradient; a requested one is zero.
void FillLabelGradient(const OpContext& ctx, int64_t rows, OpReq req, const TBlob& grad) {
  if (req != OpReq::kWrite) return;
  kernel::Launch<kernel::FillKernel>("SoftmaxOutput", ctx.ctx, rows, {grad.data, 0.0f});
}

void Backward(const OpContext& ctx, const ParsedParams& p,
              const std::vector<TBlob>&, const std::vector<TBlob>& in,
              const std::vector<TBlob>& out, const std::vector<OpReq>& req,
              const std::vector<TBlob>& in_grad, const std::vector<TBlob>&) {
  int64_t rows, classes;
  Dims(in[0].shape, &rows, &classes);
  const float* label = in[1].data;
  const bool use_ignore = p.GetBool("use_ignore");
  const float ignore = p.GetFloat("ignore_label");
  const std::string& norm = p.GetString("normalization");
  float scale = p.GetFloat("grad_scale");
  if (norm == "batch") scale /= std::max<int64_t>(rows, 1);
  if (req[0] == OpReq::kNull) return FillLabelGradient(ctx, rows, req[1], in_grad[1]);
  // 'valid' divides by the rows whose label is not ignore_label, with or
  // without use_ignore (as MXNet, which counts them either way), counted
  // where the labels are (on a GPU too, with no copy to the host): a 0/1
  // mask summed into the workspace's last float, which the gradient kernel
  // divides by.
  const float* valid = nullptr;
  if (norm == "valid" && rows > 0) {
    float* mask = ctx.workspace;
    kernel::Launch<kernel::ValidLabelKernel>("SoftmaxOutput", ctx.ctx, rows, {mask, label, ignore});
    kernel::Reduce<kernel::SumReducer>("SoftmaxOutput", ctx.ctx, mask, mask + rows, 1, rows, 1);
    valid = mask + rows;
  }
  kernel::Launch<kernel::SoftmaxOutputGradKernel>(
      "SoftmaxOutput", ctx.ctx, rows * classes,
      {in_grad[0].data, out[0].data, label, classes, scale, ignore, use_ignore,
       req[0] == OpReq::kAdd, valid});
  FillLabelGradient(ctx, rows, req[1], in_grad[1]);
}

// rows floats of mask and one of count for normalization='valid'
// (Backward); none otherwise.
size_t Workspace(const ParsedParams& p, const ShapeList& in, const ShapeList&, Context) {
  if (p.GetString("normalization") != "valid") return 0;
  return in[0].ndim() > 0 ? (in[0][0] + 1) * sizeof(float) : 0;
}

OpDef Make() {
  OpDef op;
  op.name = "SoftmaxOutput";
  op.params = {{"grad_scale", ParamSpec::Type::kFloat, "1"},
               {"ignore_label", ParamSpec::Type::kFloat, "-1"},
               {"use_ignore", ParamSpec::Type::kBool, "False"},
               {"multi_output", ParamSpec::Type::kBool, "False"},
               {"preserve_shape", ParamSpec::Type::kBool, "False"},
               {"normalization", ParamSpec::Type::kString, "null",
                false, {"null", "batch", "valid"}},
               {"out_grad", ParamSpec::Type::kBool, "False"},
               {"smooth_alpha", ParamSpec::Type::kFloat, "0"}};
  op.arguments = Names({"data", "label"});
  op.infer_shape = Infer;
  op.forward = Forward;
  op.backward = Backward;
  op.workspace = Workspace;
  op.is_loss = true;
  op.gpu = true;
  return op;
}

MX_REGISTER_OP(Make());

}  // namespace
}  // namespace mx::ops
