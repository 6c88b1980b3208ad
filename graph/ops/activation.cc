// Activation (relu, sigmoid, tanh, softrelu). The gradient is computed from
// the output alone, so the output may overwrite the input.
#include <cmath>

#include "graph/ops/op_util.h"

namespace mx::ops {
namespace {

float Apply(const std::string& act, float x) {
  if (act == "relu") return x > 0 ? x : 0.0f;
  if (act == "sigmoid") return 1.0f / (1.0f + std::exp(-x));
  if (act == "tanh") return std::tanh(x);
  // softrelu: log(1 + e^x), computed stably.
  return x > 0 ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x));
}

// d activation / d x expressed through the output y.
float GradFromOutput(const std::string& act, float y) {
  if (act == "relu") return y > 0 ? 1.0f : 0.0f;
  if (act == "sigmoid") return y * (1.0f - y);
  if (act == "tanh") return 1.0f - y * y;
  return -std::expm1(-y);  // softrelu: sigmoid(x) = 1 - e^{-y}
}

template <typename F>
void ForEach(const std::string& act, F f) {
  // Dispatch once per call, not per element.
  if (act == "relu") return f([](float x) { return x > 0 ? x : 0.0f; },
                              [](float y) { return y > 0 ? 1.0f : 0.0f; });
  f([&act](float x) { return Apply(act, x); },
    [&act](float y) { return GradFromOutput(act, y); });
}

OpDef Make() {
  OpDef op;
  op.name = "Activation";
  op.params = {{"act_type", ParamSpec::Type::kString, "", true,
                {"relu", "sigmoid", "tanh", "softrelu"}}};
  op.infer_shape = SameShapeInfer;
  op.inplace = {{0, 0}};
  op.backward_uses_inputs = false;
  op.forward = [](const OpContext&, const ParsedParams& p,
                  const std::vector<TBlob>& in, const std::vector<OpReq>& req,
                  const std::vector<TBlob>& out, const std::vector<TBlob>&) {
    ForEach(p.GetString("act_type"), [&](auto fwd, auto) {
      MapStore(req[0], in[0].data, out[0].data, out[0].Size(), fwd);
    });
  };
  op.backward = [](const OpContext&, const ParsedParams& p,
                   const std::vector<TBlob>& out_grad, const std::vector<TBlob>&,
                   const std::vector<TBlob>& out, const std::vector<OpReq>& req,
                   const std::vector<TBlob>& in_grad, const std::vector<TBlob>&) {
    ForEach(p.GetString("act_type"), [&](auto, auto grad) {
      const float* g = out_grad[0].data;
      const float* y = out[0].data;
      float* gi = in_grad[0].data;
      const int64_t n = out[0].Size();
      if (req[0] == OpReq::kWrite) {
        for (int64_t i = 0; i < n; ++i) gi[i] = g[i] * grad(y[i]);
      } else if (req[0] == OpReq::kAdd) {
        for (int64_t i = 0; i < n; ++i) gi[i] += g[i] * grad(y[i]);
      }
    });
  };
  return op;
}

MX_REGISTER_OP(Make());

}  // namespace
}  // namespace mx::ops
