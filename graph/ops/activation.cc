// Activation (relu, sigmoid, tanh, softrelu). The gradient is computed from
// the output alone, so the output may overwrite the input.
#include <cmath>
#include <type_traits>

#include "graph/ops/op_util.h"

namespace mx::ops {
namespace {

enum class Act { kRelu, kSigmoid, kTanh, kSoftRelu };

Act Parse(const std::string& act) {
  if (act == "relu") return Act::kRelu;
  if (act == "sigmoid") return Act::kSigmoid;
  if (act == "tanh") return Act::kTanh;
  return Act::kSoftRelu;  // the only other value ParamSpec admits
}

template <Act A>
inline float Apply(float x) {
  if constexpr (A == Act::kRelu) return x > 0 ? x : 0.0f;
  if constexpr (A == Act::kSigmoid) return 1.0f / (1.0f + std::exp(-x));
  if constexpr (A == Act::kTanh) return std::tanh(x);
  // softrelu: log(1 + e^x), computed stably.
  return x > 0 ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x));
}

// d activation / d x expressed through the output y.
template <Act A>
inline float GradFromOutput(float y) {
  if constexpr (A == Act::kRelu) return y > 0 ? 1.0f : 0.0f;
  if constexpr (A == Act::kSigmoid) return y * (1.0f - y);
  if constexpr (A == Act::kTanh) return 1.0f - y * y;
  return -std::expm1(-y);  // softrelu: sigmoid(x) = 1 - e^{-y}
}

template <Act A>
void ForwardLoop(OpReq req, const float* x, float* y, int64_t n) {
  MapStore(req, x, y, n, [](float v) { return Apply<A>(v); });
}

template <Act A>
void BackwardLoop(OpReq req, const float* g, const float* y, float* gi, int64_t n) {
  if constexpr (A == Act::kRelu) {
    // A select of an unconditionally loaded value vectorizes; g * (y > 0)
    // does not (GCC sees control flow) and mispredicts on random signs.
    if (req == OpReq::kWrite) {
      for (int64_t i = 0; i < n; ++i) {
        const float v = g[i];
        gi[i] = y[i] > 0 ? v : 0.0f;
      }
    } else if (req == OpReq::kAdd) {
      for (int64_t i = 0; i < n; ++i) {
        const float v = g[i];
        gi[i] += y[i] > 0 ? v : 0.0f;
      }
    }
    return;
  }
  if (req == OpReq::kWrite) {
    for (int64_t i = 0; i < n; ++i) gi[i] = g[i] * GradFromOutput<A>(y[i]);
  } else if (req == OpReq::kAdd) {
    for (int64_t i = 0; i < n; ++i) gi[i] += g[i] * GradFromOutput<A>(y[i]);
  }
}

// Calls f.template operator()<A>() for the parsed activation: the type is
// dispatched once per call, and each loop is compiled for one function.
template <typename F>
void Dispatch(const std::string& act, F f) {
  switch (Parse(act)) {
    case Act::kRelu: return f(std::integral_constant<Act, Act::kRelu>());
    case Act::kSigmoid: return f(std::integral_constant<Act, Act::kSigmoid>());
    case Act::kTanh: return f(std::integral_constant<Act, Act::kTanh>());
    case Act::kSoftRelu: return f(std::integral_constant<Act, Act::kSoftRelu>());
  }
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
    Dispatch(p.GetString("act_type"), [&](auto act) {
      ForwardLoop<decltype(act)::value>(req[0], in[0].data, out[0].data, out[0].Size());
    });
  };
  op.backward = [](const OpContext&, const ParsedParams& p,
                   const std::vector<TBlob>& out_grad, const std::vector<TBlob>&,
                   const std::vector<TBlob>& out, const std::vector<OpReq>& req,
                   const std::vector<TBlob>& in_grad, const std::vector<TBlob>&) {
    Dispatch(p.GetString("act_type"), [&](auto act) {
      BackwardLoop<decltype(act)::value>(req[0], out_grad[0].data, out[0].data,
                                         in_grad[0].data, out[0].Size());
    });
  };
  return op;
}

MX_REGISTER_OP(Make());

}  // namespace
}  // namespace mx::ops
