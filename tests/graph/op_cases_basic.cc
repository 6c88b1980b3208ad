// Cases for the element-wise, FullyConnected, Activation and SoftmaxOutput
// operators.
#include <cmath>

#include "tests/graph/op_harness.h"

namespace mx::testing {
namespace {

OpCase Binary(const char* name, const char* op, float (*f)(float, float)) {
  OpCase c;
  c.name = name;
  c.op = op;
  c.inputs = {Shape{3, 4}, Shape{3, 4}};
  c.init = [](int, std::vector<float>* v) {
    for (float& x : *v) x = x >= 0 ? x + 0.5f : x - 0.5f;  // away from 0 for div
  };
  c.reference = [f](const HostArrays& in, const HostArrays&) {
    std::vector<float> out(in[0].size());
    for (size_t i = 0; i < out.size(); ++i) out[i] = f(in[0][i], in[1][i]);
    return HostArrays{out};
  };
  return c;
}

MX_OP_CASE(Binary("elemwise_add", "elemwise_add", [](float a, float b) { return a + b; }));
MX_OP_CASE(Binary("elemwise_sub", "elemwise_sub", [](float a, float b) { return a - b; }));
MX_OP_CASE(Binary("elemwise_mul", "elemwise_mul", [](float a, float b) { return a * b; }));
MX_OP_CASE(Binary("elemwise_div", "elemwise_div", [](float a, float b) { return a / b; }));

OpCase Scalar(const char* name, const char* op, float s, float (*f)(float, float)) {
  OpCase c;
  c.name = name;
  c.op = op;
  c.params = {{"scalar", s}};
  c.inputs = {Shape{2, 5}};
  c.init = [](int, std::vector<float>* v) {
    for (float& x : *v) x = x >= 0 ? x + 0.5f : x - 0.5f;
  };
  c.reference = [f, s](const HostArrays& in, const HostArrays&) {
    std::vector<float> out(in[0].size());
    for (size_t i = 0; i < out.size(); ++i) out[i] = f(in[0][i], s);
    return HostArrays{out};
  };
  return c;
}

MX_OP_CASE(Scalar("plus_scalar", "_plus_scalar", 2.5f, [](float x, float s) { return x + s; }));
MX_OP_CASE(Scalar("minus_scalar", "_minus_scalar", 2.5f, [](float x, float s) { return x - s; }));
MX_OP_CASE(Scalar("rminus_scalar", "_rminus_scalar", 2.5f, [](float x, float s) { return s - x; }));
MX_OP_CASE(Scalar("mul_scalar", "_mul_scalar", -3.0f, [](float x, float s) { return x * s; }));
MX_OP_CASE(Scalar("div_scalar", "_div_scalar", 4.0f, [](float x, float s) { return x / s; }));
MX_OP_CASE(Scalar("rdiv_scalar", "_rdiv_scalar", 2.0f, [](float x, float s) { return s / x; }));

HostArrays FcReference(const HostArrays& in, int64_t rows, int64_t in_dim,
                       int64_t hidden, bool bias) {
  std::vector<float> out(rows * hidden);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t h = 0; h < hidden; ++h) {
      double acc = bias ? in[2][h] : 0.0;
      for (int64_t k = 0; k < in_dim; ++k) acc += double(in[0][r * in_dim + k]) * in[1][h * in_dim + k];
      out[r * hidden + h] = static_cast<float>(acc);
    }
  }
  return {out};
}

OpCase Fc(const char* name, Shape data, int64_t hidden, bool no_bias, bool flatten) {
  OpCase c;
  c.name = name;
  c.op = "FullyConnected";
  c.params = {{"num_hidden", hidden}, {"no_bias", no_bias}, {"flatten", flatten}};
  int64_t in_dim = flatten ? data.RowSize() : data[data.ndim() - 1];
  int64_t rows = data.Size() / in_dim;
  c.inputs = {data, Shape{hidden, in_dim}};
  if (!no_bias) c.inputs.push_back(Shape{hidden});
  c.reference = [=](const HostArrays& in, const HostArrays&) {
    return FcReference(in, rows, in_dim, hidden, !no_bias);
  };
  return c;
}

MX_OP_CASE(Fc("FullyConnected", Shape{4, 6}, 5, false, true));
MX_OP_CASE(Fc("FullyConnected_no_bias", Shape{4, 6}, 3, true, true));
MX_OP_CASE(Fc("FullyConnected_flatten_4d", Shape{2, 3, 2, 2}, 4, false, true));
MX_OP_CASE(Fc("FullyConnected_no_flatten", Shape{2, 3, 5}, 4, false, false));

OpCase Act(const char* name, const char* type, float (*f)(float)) {
  OpCase c;
  c.name = name;
  c.op = "Activation";
  c.params = {{"act_type", type}};
  c.inputs = {Shape{3, 7}};
  c.init = [](int, std::vector<float>* v) {
    for (float& x : *v) x = 2 * x + (x >= 0 ? 0.1f : -0.1f);  // relu kink avoided
  };
  c.reference = [f](const HostArrays& in, const HostArrays&) {
    std::vector<float> out(in[0].size());
    for (size_t i = 0; i < out.size(); ++i) out[i] = f(in[0][i]);
    return HostArrays{out};
  };
  return c;
}

MX_OP_CASE(Act("Activation_relu", "relu", [](float x) { return x > 0 ? x : 0.0f; }));
MX_OP_CASE(Act("Activation_sigmoid", "sigmoid", [](float x) { return 1 / (1 + std::exp(-x)); }));
MX_OP_CASE(Act("Activation_tanh", "tanh", [](float x) { return std::tanh(x); }));
MX_OP_CASE(Act("Activation_softrelu", "softrelu", [](float x) { return std::log1p(std::exp(x)); }));
MX_OP_CASE(Act("Activation_softsign", "softsign", [](float x) { return x / (1 + std::fabs(x)); }));

HostArrays SoftmaxRows(const std::vector<float>& x, int64_t rows, int64_t classes) {
  std::vector<float> out(x.size());
  for (int64_t r = 0; r < rows; ++r) {
    double m = -1e30, sum = 0;
    for (int64_t k = 0; k < classes; ++k) m = std::max<double>(m, x[r * classes + k]);
    for (int64_t k = 0; k < classes; ++k) sum += std::exp(x[r * classes + k] - m);
    for (int64_t k = 0; k < classes; ++k) out[r * classes + k] = std::exp(x[r * classes + k] - m) / sum;
  }
  return {out};
}

// Rows whose label is `ignore` (when not -1) add nothing to the loss.
OpCase Softmax(const char* name, Params params, double scale, float ignore = -1) {
  OpCase c;
  c.name = name;
  c.op = "SoftmaxOutput";
  c.params = params;
  const int64_t rows = 4, classes = 5;
  c.inputs = {Shape{rows, classes}, Shape{rows}};
  c.no_grad = {1};
  c.init = [](int i, std::vector<float>* v) {
    if (i == 1) {
      for (size_t r = 0; r < v->size(); ++r) (*v)[r] = static_cast<float>(r % classes);
    }
  };
  c.reference = [=](const HostArrays& in, const HostArrays&) {
    return SoftmaxRows(in[0], rows, classes);
  };
  // Backward is the gradient of scale * cross-entropy.
  c.loss = [=](const HostArrays& out, const HostArrays& in) {
    double total = 0;
    for (int64_t r = 0; r < rows; ++r) {
      if (in[1][r] == ignore) continue;
      total -= std::log(out[0][r * classes + static_cast<int64_t>(in[1][r])]);
    }
    return scale * total;
  };
  return c;
}

MX_OP_CASE(Softmax("SoftmaxOutput", {}, 1.0));
MX_OP_CASE(Softmax("SoftmaxOutput_batch_norm_scaled",
                   {{"normalization", "batch"}, {"grad_scale", 2.0f}}, 2.0 / 4));
// Labels 0, 1, 2, 3: with 1 ignored, 3 rows count.
MX_OP_CASE(Softmax("SoftmaxOutput_valid_ignored",
                   {{"normalization", "valid"},
                    {"use_ignore", true},
                    {"ignore_label", 1.0f},
                    {"grad_scale", 1.5f}},
                   1.5 / 3, 1.0f));
MX_OP_CASE(Softmax("SoftmaxOutput_null_ignored", {{"use_ignore", true}, {"ignore_label", 2.0f}},
                   1.0, 2.0f));
// Without use_ignore, 'valid' counts every row whose label is not
// ignore_label (as MXNet), while every row has its gradient.
MX_OP_CASE(Softmax("SoftmaxOutput_valid", {{"normalization", "valid"}}, 1.0 / 4));
MX_OP_CASE(Softmax("SoftmaxOutput_valid_counts_without_use_ignore",
                   {{"normalization", "valid"}, {"ignore_label", 1.0f}}, 1.0 / 3));

}  // namespace
}  // namespace mx::testing
