// FullyConnected: out = data * weight^T + bias, with weight of shape
// (num_hidden, input_dim) as in MXNet. With flatten (the default) data is
// viewed as (batch, everything else); without, the last axis is the input.
#include "graph/ops/op_util.h"
#include "ndarray/launch.h"
#include "ndarray/nn_kernels.h"

namespace mx::ops {
namespace {

// Rows and input size of data as the operator views it.
void Dims(const ParsedParams& p, const Shape& data, int64_t* rows,
          int64_t* in_dim) {
  if (p.GetBool("flatten")) {
    *rows = data[0];
    *in_dim = data.RowSize();
  } else {
    *in_dim = data[data.ndim() - 1];
    *rows = data.Size() / std::max<int64_t>(*in_dim, 1);
  }
}

absl::Status Infer(const ParsedParams& p, ShapeList* in, ShapeList* out,
                   ShapeList*) {
  const int64_t hidden = p.GetInt("num_hidden");
  const bool bias = !p.GetBool("no_bias");
  const Shape& data = (*in)[0];
  if (data.ndim() == 0) {
    // Only the weight can say something: the input size.
    return absl::OkStatus();
  }
  const bool flatten = p.GetBool("flatten");
  int64_t in_dim = 0;
  if (flatten) {
    in_dim = data.RowSize();
    for (int d = 1; d < data.ndim(); ++d) {
      if (data[d] == 0) in_dim = 0;
    }
  } else {
    in_dim = data[data.ndim() - 1];
  }
  MX_RETURN_IF_ERROR(MergeShape(in, 1, Shape{hidden, in_dim}, "input weight"));
  if (bias) MX_RETURN_IF_ERROR(MergeShape(in, 2, Shape{hidden}, "input bias"));
  Shape o;
  if (flatten) {
    o = Shape{data[0], hidden};
  } else {
    o = data;
    o[o.ndim() - 1] = hidden;
  }
  MX_RETURN_IF_ERROR(MergeShape(out, 0, o, "output"));
  return absl::OkStatus();
}

void Forward(const OpContext& ctx, const ParsedParams& p,
             const std::vector<TBlob>& in, const std::vector<OpReq>& req,
             const std::vector<TBlob>& out, const std::vector<TBlob>&) {
  int64_t rows, in_dim;
  Dims(p, in[0].shape, &rows, &in_dim);
  const int64_t hidden = p.GetInt("num_hidden");
  float* o = out[0].data;
  Gemm(ctx.ctx, req[0], false, true, rows, hidden, in_dim, 1.0f, in[0].data, in[1].data, o);
  if (!p.GetBool("no_bias") && req[0] != OpReq::kNull) {
    kernel::Launch<kernel::AddBiasKernel>("FullyConnected", ctx.ctx, rows * hidden,
                                          {o, in[2].data, hidden});
  }
}

void Backward(const OpContext& ctx, const ParsedParams& p,
              const std::vector<TBlob>& out_grad, const std::vector<TBlob>& in,
              const std::vector<TBlob>&, const std::vector<OpReq>& req,
              const std::vector<TBlob>& in_grad, const std::vector<TBlob>&) {
  int64_t rows, in_dim;
  Dims(p, in[0].shape, &rows, &in_dim);
  const int64_t hidden = p.GetInt("num_hidden");
  const float* g = out_grad[0].data;
  // d data = g * W ; d W = g^T * data ; d bias = column sums of g.
  Gemm(ctx.ctx, req[0], false, false, rows, in_dim, hidden, 1.0f, g, in[1].data,
       in_grad[0].data);
  Gemm(ctx.ctx, req[1], true, false, hidden, in_dim, rows, 1.0f, g, in[0].data,
       in_grad[1].data);
  if (!p.GetBool("no_bias") && req[2] != OpReq::kNull) {
    kernel::Reduce<kernel::SumReducer>("FullyConnected bias gradient", ctx.ctx, g,
                                       in_grad[2].data, 1, rows, hidden,
                                       req[2] == OpReq::kAdd);
  }
}

OpDef Make() {
  OpDef op;
  op.name = "FullyConnected";
  op.params = {{"num_hidden", ParamSpec::Type::kInt, "", true, {}, 1},
               {"no_bias", ParamSpec::Type::kBool, "False"},
               {"flatten", ParamSpec::Type::kBool, "True"}};
  op.arguments = [](const ParsedParams& p) {
    return p.GetBool("no_bias") ? std::vector<std::string>{"data", "weight"}
                                : std::vector<std::string>{"data", "weight", "bias"};
  };
  op.infer_shape = Infer;
  op.forward = Forward;
  op.backward = Backward;
  op.backward_uses_outputs = OpDef::OutputUse::kNone;
  op.uses_all_cores = true;
  op.gpu = true;
  return op;
}

MX_REGISTER_OP(Make());

}  // namespace
}  // namespace mx::ops
