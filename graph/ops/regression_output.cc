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
#include <cmath>
#include <vector>

#include "graph/ops/op_util.h"

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

OpDef MakeRegression(const char* name, Regression kind) {
  OpDef op;
  op.name = name;
  op.params = {{"grad_scale", ParamSpec::Type::kFloat, "1"}};
  op.arguments = Names({"data", "label"});
  op.infer_shape = RegressionInfer;
  op.is_loss = true;
  op.inplace = {{0, 0}};
  op.forward = [kind](const OpContext&, const ParsedParams&,
                      const std::vector<TBlob>& in, const std::vector<OpReq>& req,
                      const std::vector<TBlob>& out, const std::vector<TBlob>&) {
    MapStore(req[0], in[0].data, out[0].data, out[0].Size(), [kind](float x) {
      return kind == Regression::kLogistic ? 1.0f / (1.0f + std::exp(-x)) : x;
    });
  };
  op.backward = [kind](const OpContext&, const ParsedParams& p,
                       const std::vector<TBlob>&, const std::vector<TBlob>& in,
                       const std::vector<TBlob>& out, const std::vector<OpReq>& req,
                       const std::vector<TBlob>& in_grad,
                       const std::vector<TBlob>&) {
    const Shape& label_shape = in[1].shape;
    const int64_t batch = label_shape.ndim() > 0 ? label_shape[0] : 1;
    const float num_output =
        static_cast<float>(label_shape.Size() / std::max<int64_t>(batch, 1));
    const float scale = p.GetFloat("grad_scale") / num_output;
    const float* y = out[0].data;
    const float* label = in[1].data;
    const int64_t n = out[0].Size();
    if (req[0] != OpReq::kNull) {
      for (int64_t i = 0; i < n; ++i) {
        const float d = y[i] - label[i];
        const float v = kind == Regression::kMAE ? (d > 0 ? 1.0f : -1.0f) : d;
        Store(req[0], in_grad[0].data + i, v * scale);
      }
    }
    if (req[1] == OpReq::kWrite) {
      std::fill(in_grad[1].data, in_grad[1].data + in[1].Size(), 0.0f);
    }
  };
  return op;
}

MX_REGISTER_OP(MakeRegression("LinearRegressionOutput", Regression::kLinear));
MX_REGISTER_OP(MakeRegression("LogisticRegressionOutput", Regression::kLogistic));
MX_REGISTER_OP(MakeRegression("MAERegressionOutput", Regression::kMAE));

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

// Calls f(offset of class 0, stride between classes) for every softmax.
template <typename F>
void ForEachSoftmax(const SoftmaxLayout& l, F f) {
  for (int64_t o = 0; o < l.outer; ++o) {
    for (int64_t i = 0; i < l.inner; ++i) f(o * l.classes * l.inner + i, l.inner);
  }
}

OpDef MakeSoftmaxActivation() {
  OpDef op;
  op.name = "SoftmaxActivation";
  op.params = {{"mode", ParamSpec::Type::kString, "instance", false,
                {"instance", "channel"}}};
  op.infer_shape = SoftmaxActivationInfer;
  op.inplace = {{0, 0}};
  op.backward_uses_inputs = false;
  op.forward = [](const OpContext&, const ParsedParams& p,
                  const std::vector<TBlob>& in, const std::vector<OpReq>& req,
                  const std::vector<TBlob>& out, const std::vector<TBlob>&) {
    const SoftmaxLayout l = GetSoftmaxLayout(p, in[0].shape);
    std::vector<float> e(l.classes);
    ForEachSoftmax(l, [&](int64_t base, int64_t stride) {
      const float* x = in[0].data + base;
      float m = x[0];
      for (int64_t k = 1; k < l.classes; ++k) m = std::max(m, x[k * stride]);
      double sum = 0;
      for (int64_t k = 0; k < l.classes; ++k) {
        e[k] = std::exp(x[k * stride] - m);
        sum += e[k];
      }
      const float inv = static_cast<float>(1.0 / sum);
      float* y = out[0].data + base;
      for (int64_t k = 0; k < l.classes; ++k) Store(req[0], y + k * stride, e[k] * inv);
    });
  };
  op.backward = [](const OpContext&, const ParsedParams& p,
                   const std::vector<TBlob>& out_grad, const std::vector<TBlob>&,
                   const std::vector<TBlob>& out, const std::vector<OpReq>& req,
                   const std::vector<TBlob>& in_grad, const std::vector<TBlob>&) {
    if (req[0] == OpReq::kNull) return;
    const SoftmaxLayout l = GetSoftmaxLayout(p, out[0].shape);
    ForEachSoftmax(l, [&](int64_t base, int64_t stride) {
      const float* g = out_grad[0].data + base;
      const float* y = out[0].data + base;
      double dot = 0;
      for (int64_t k = 0; k < l.classes; ++k) dot += double(g[k * stride]) * y[k * stride];
      float* gi = in_grad[0].data + base;
      for (int64_t k = 0; k < l.classes; ++k) {
        const int64_t j = k * stride;
        Store(req[0], gi + j, y[j] * (g[j] - static_cast<float>(dot)));
      }
    });
  };
  return op;
}

MX_REGISTER_OP(MakeSoftmaxActivation());

}  // namespace
}  // namespace mx::ops
