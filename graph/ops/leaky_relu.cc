// LeakyReLU, as MXNet's, for act_type
//   leaky: x > 0 ? x : slope * x
//   elu:   x > 0 ? x : slope * (e^x - 1)
//   selu:  lambda * (x > 0 ? x : alpha * (e^x - 1)), MXNet's constants
//   gelu:  0.5 * x * (1 + erf(x / sqrt(2)))
//   prelu: x > 0 ? x : gamma[c] * x, with a learnt gamma per channel (axis
//          1) or a single one (shape (1,)); takes a second argument, gamma.
// rrelu (a random slope in training) is not supported: shape inference
// reports it as Unimplemented.
#include <cmath>

#include "graph/ops/op_util.h"

namespace mx::ops {
namespace {

constexpr float kSeluAlpha = 1.6732632423543772848170429916717f;
constexpr float kSeluLambda = 1.0507009873554804934193349852946f;
constexpr float kSqrtHalf = 0.70710678118654752440f;    // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;  // 1 / sqrt(2 pi)

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

void Forward(const OpContext&, const ParsedParams& p,
             const std::vector<TBlob>& in, const std::vector<OpReq>& req,
             const std::vector<TBlob>& out, const std::vector<TBlob>&) {
  const std::string& act = p.GetString("act_type");
  const float slope = p.GetFloat("slope");
  const float* x = in[0].data;
  float* y = out[0].data;
  const int64_t n = out[0].Size();
  if (act == "leaky") {
    MapStore(req[0], x, y, n, [slope](float v) { return v > 0 ? v : slope * v; });
  } else if (act == "elu") {
    MapStore(req[0], x, y, n,
             [slope](float v) { return v > 0 ? v : slope * std::expm1(v); });
  } else if (act == "selu") {
    MapStore(req[0], x, y, n, [](float v) {
      return kSeluLambda * (v > 0 ? v : kSeluAlpha * std::expm1(v));
    });
  } else if (act == "gelu") {
    MapStore(req[0], x, y, n, [](float v) {
      return 0.5f * v * (1.0f + std::erf(v * kSqrtHalf));
    });
  } else {  // prelu
    int64_t channels, inner;
    PreluDims(in[0].shape, in[1].shape, &channels, &inner);
    const float* gamma = in[1].data;
    for (int64_t i = 0; i < n; ++i) {
      const float a = gamma[channels == 1 ? 0 : (i / inner) % channels];
      Store(req[0], y + i, x[i] > 0 ? x[i] : a * x[i]);
    }
  }
}

// dy/dx for the act types whose derivative follows from the output.
float GradFromOutput(const std::string& act, float slope, float y) {
  if (act == "leaky") return y > 0 ? 1.0f : slope;
  if (act == "elu") return y > 0 ? 1.0f : y + slope;
  return y > 0 ? kSeluLambda : y + kSeluLambda * kSeluAlpha;  // selu
}

float GeluGrad(float x) {
  const float cdf = 0.5f * (1.0f + std::erf(x * kSqrtHalf));
  const float pdf = std::exp(-0.5f * x * x) * kInvSqrt2Pi;
  return cdf + x * pdf;
}

void Backward(const OpContext&, const ParsedParams& p,
              const std::vector<TBlob>& out_grad, const std::vector<TBlob>& in,
              const std::vector<TBlob>& out, const std::vector<OpReq>& req,
              const std::vector<TBlob>& in_grad, const std::vector<TBlob>&) {
  const std::string& act = p.GetString("act_type");
  const float slope = p.GetFloat("slope");
  const float* g = out_grad[0].data;
  const float* x = in[0].data;
  const float* y = out[0].data;
  float* gi = in_grad[0].data;
  const int64_t n = out_grad[0].Size();
  if (act == "prelu") {
    int64_t channels, inner;
    PreluDims(in[0].shape, in[1].shape, &channels, &inner);
    const float* gamma = in[1].data;
    std::vector<double> dgamma(channels, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = channels == 1 ? 0 : (i / inner) % channels;
      if (req[0] != OpReq::kNull) Store(req[0], gi + i, x[i] > 0 ? g[i] : gamma[c] * g[i]);
      if (x[i] <= 0) dgamma[c] += static_cast<double>(g[i]) * x[i];
    }
    for (int64_t c = 0; c < channels && req[1] != OpReq::kNull; ++c) {
      Store(req[1], in_grad[1].data + c, static_cast<float>(dgamma[c]));
    }
    return;
  }
  if (req[0] == OpReq::kNull) return;
  for (int64_t i = 0; i < n; ++i) {
    const float d = act == "gelu" ? GeluGrad(x[i]) : GradFromOutput(act, slope, y[i]);
    Store(req[0], gi + i, g[i] * d);
  }
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
  return op;
}

MX_REGISTER_OP(Make());

}  // namespace
}  // namespace mx::ops
