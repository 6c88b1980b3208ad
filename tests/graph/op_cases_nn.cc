// Cases for BatchNorm, Dropout, LeakyReLU, the regression outputs,
// SoftmaxActivation and Embedding.
//
// The harness computes the analytic gradient after a training forward and
// the finite differences with forward(is_train). Cases whose forward
// depends on is_train (BatchNorm without use_global_stats, Dropout) check
// gradients only where both agree: is_train=true cases for batch
// statistics, use_global_stats for the moving ones, p=0 for Dropout. The
// training behaviour of Dropout and the moving averages of BatchNorm have
// their own tests (dropout_test.cc, batch_norm_test.cc).
#include <algorithm>
#include <cmath>
#include <string>

#include "tests/graph/op_harness.h"

namespace mx::testing {
namespace {

// ---- BatchNorm

struct BnConfig {
  Shape shape;
  int axis = 1;
  bool fix_gamma = true;
  bool use_global_stats = false;
  bool output_mean_var = false;
  bool is_train = true;
};

// out, and with output_mean_var the mean and variance used.
HostArrays BnReference(const BnConfig& cfg, const HostArrays& in, const HostArrays& aux) {
  const Shape& s = cfg.shape;
  const int axis = cfg.axis < 0 ? cfg.axis + s.ndim() : cfg.axis;
  int64_t outer = 1, channels = s[axis], inner = 1;
  for (int d = 0; d < axis; ++d) outer *= s[d];
  for (int d = axis + 1; d < s.ndim(); ++d) inner *= s[d];
  const double eps = 1e-3;
  std::vector<float> out(in[0].size()), means(channels), vars(channels);
  for (int64_t c = 0; c < channels; ++c) {
    auto at = [&](int64_t o, int64_t i) { return (o * channels + c) * inner + i; };
    double mean = aux[0][c], var = aux[1][c];
    if (cfg.is_train && !cfg.use_global_stats) {
      double sum = 0, sq = 0;
      for (int64_t o = 0; o < outer; ++o) {
        for (int64_t i = 0; i < inner; ++i) sum += in[0][at(o, i)];
      }
      mean = sum / (outer * inner);
      for (int64_t o = 0; o < outer; ++o) {
        for (int64_t i = 0; i < inner; ++i) sq += std::pow(in[0][at(o, i)] - mean, 2);
      }
      var = sq / (outer * inner);
    }
    const double gamma = cfg.fix_gamma ? 1.0 : in[1][c];
    for (int64_t o = 0; o < outer; ++o) {
      for (int64_t i = 0; i < inner; ++i) {
        const int64_t k = at(o, i);
        out[k] = static_cast<float>((in[0][k] - mean) / std::sqrt(var + eps) * gamma + in[2][c]);
      }
    }
    means[c] = static_cast<float>(mean);
    vars[c] = static_cast<float>(var);
  }
  if (cfg.output_mean_var) return {out, means, vars};
  return {out};
}

OpCase Bn(const char* name, BnConfig cfg) {
  OpCase c;
  c.name = name;
  c.op = "BatchNorm";
  c.params = {{"fix_gamma", cfg.fix_gamma},
              {"use_global_stats", cfg.use_global_stats},
              {"output_mean_var", cfg.output_mean_var},
              {"axis", cfg.axis}};
  const int axis = cfg.axis < 0 ? cfg.axis + cfg.shape.ndim() : cfg.axis;
  const Shape channels{cfg.shape[axis]};
  c.inputs = {cfg.shape, channels, channels};
  c.aux = {channels, channels};
  c.is_train = cfg.is_train;
  c.reference = [cfg](const HostArrays& in, const HostArrays& aux) {
    return BnReference(cfg, in, aux);
  };
  return c;
}

MX_OP_CASE(Bn("BatchNorm_train_4d", {Shape{2, 3, 2, 2}, 1, false}));
MX_OP_CASE(Bn("BatchNorm_train_fix_gamma", {Shape{6, 3}, 1, true}));
MX_OP_CASE(Bn("BatchNorm_train_axis_last", {Shape{2, 3, 4}, -1, false}));
MX_OP_CASE(Bn("BatchNorm_train_axis_0", {Shape{3, 5}, 0, false}));
MX_OP_CASE(Bn("BatchNorm_global_stats", {Shape{2, 3, 2, 2}, 1, false, true, false, false}));
MX_OP_CASE(Bn("BatchNorm_global_stats_train", {Shape{4, 3}, 1, false, true, false, true}));
MX_OP_CASE([] {
  // Moving statistics in inference. The harness's gradient comes from a
  // training forward (batch statistics), so only forward is checked here.
  OpCase c = Bn("BatchNorm_inference", {Shape{2, 3, 2}, 1, false, false, false, false});
  c.check_grad = false;
  return c;
}());
MX_OP_CASE([] {
  // MXNet ignores the head gradients of mean and var, so finite
  // differences of a loss over all three outputs do not apply.
  OpCase c = Bn("BatchNorm_output_mean_var", {Shape{3, 2, 2}, 1, false, false, true, true});
  c.check_grad = false;
  return c;
}());

// ---- Dropout

OpCase DropoutIdentity(const char* name, Params params, bool is_train) {
  OpCase c;
  c.name = name;
  c.op = "Dropout";
  c.params = std::move(params);
  c.inputs = {Shape{3, 4}};
  c.is_train = is_train;
  c.reference = [](const HostArrays& in, const HostArrays&) { return HostArrays{in[0]}; };
  return c;
}

MX_OP_CASE([] {
  // The harness differentiates after a training forward, which drops.
  OpCase c = DropoutIdentity("Dropout_inference_identity", {{"p", 0.5f}}, false);
  c.check_grad = false;
  return c;
}());
MX_OP_CASE([] {
  OpCase c = DropoutIdentity("Dropout_inference_identity_axes",
                             {{"p", 0.3f}, {"axes", Shape{1}}}, false);
  c.check_grad = false;
  return c;
}());
MX_OP_CASE(DropoutIdentity("Dropout_p0_training", {{"p", 0.0f}}, true));
MX_OP_CASE(DropoutIdentity("Dropout_p0_always", {{"p", 0.0f}, {"mode", "always"}}, true));

// ---- LeakyReLU

OpCase Leaky(const char* name, Params params, float (*f)(float, float), float slope) {
  OpCase c;
  c.name = name;
  c.op = "LeakyReLU";
  c.params = std::move(params);
  c.inputs = {Shape{3, 5}};
  c.init = [](int, std::vector<float>* v) {
    for (float& x : *v) x = 2 * x + (x >= 0 ? 0.1f : -0.1f);  // kink avoided
  };
  c.reference = [f, slope](const HostArrays& in, const HostArrays&) {
    std::vector<float> out(in[0].size());
    for (size_t i = 0; i < out.size(); ++i) out[i] = f(in[0][i], slope);
    return HostArrays{out};
  };
  return c;
}

constexpr double kSeluAlpha = 1.6732632423543772848170429916717;
constexpr double kSeluLambda = 1.0507009873554804934193349852946;

MX_OP_CASE(Leaky("LeakyReLU_leaky", {}, [](float x, float s) { return x > 0 ? x : s * x; },
                 0.25f));
MX_OP_CASE(Leaky("LeakyReLU_leaky_slope", {{"act_type", "leaky"}, {"slope", 0.1f}},
                 [](float x, float s) { return x > 0 ? x : s * x; }, 0.1f));
MX_OP_CASE(Leaky("LeakyReLU_elu", {{"act_type", "elu"}, {"slope", 0.7f}},
                 [](float x, float s) { return x > 0 ? x : s * std::expm1(x); }, 0.7f));
MX_OP_CASE(Leaky("LeakyReLU_selu", {{"act_type", "selu"}},
                 [](float x, float) {
                   return static_cast<float>(kSeluLambda *
                                             (x > 0 ? x : kSeluAlpha * std::expm1(x)));
                 },
                 0));
MX_OP_CASE(Leaky("LeakyReLU_gelu", {{"act_type", "gelu"}},
                 [](float x, float) {
                   return static_cast<float>(0.5 * x * (1 + std::erf(x / std::sqrt(2.0))));
                 },
                 0));

OpCase Prelu(const char* name, Shape data, Shape gamma) {
  OpCase c;
  c.name = name;
  c.op = "LeakyReLU";
  c.params = {{"act_type", "prelu"}};
  c.inputs = {data, gamma};
  c.init = [](int i, std::vector<float>* v) {
    for (float& x : *v) x = i == 0 ? 2 * x + (x >= 0 ? 0.1f : -0.1f) : 0.5f * x;
  };
  c.reference = [data](const HostArrays& in, const HostArrays&) {
    const int64_t channels = static_cast<int64_t>(in[1].size());
    int64_t inner = 1;
    for (int d = 2; d < data.ndim(); ++d) inner *= data[d];
    std::vector<float> out(in[0].size());
    for (size_t i = 0; i < out.size(); ++i) {
      const float a = in[1][channels == 1 ? 0 : (i / inner) % channels];
      out[i] = in[0][i] > 0 ? in[0][i] : a * in[0][i];
    }
    return HostArrays{out};
  };
  return c;
}

MX_OP_CASE(Prelu("LeakyReLU_prelu_per_channel", Shape{2, 3, 2}, Shape{3}));
MX_OP_CASE(Prelu("LeakyReLU_prelu_shared", Shape{3, 4}, Shape{1}));

// ---- Regression outputs

OpCase Regression(const char* name, const char* op, Shape data, Shape label,
                  float grad_scale) {
  OpCase c;
  c.name = name;
  c.op = op;
  c.params = {{"grad_scale", grad_scale}};
  c.inputs = {data, label};
  c.no_grad = {1};
  const bool logistic = std::string(op) == "LogisticRegressionOutput";
  const bool mae = std::string(op) == "MAERegressionOutput";
  c.init = [logistic, mae](int i, std::vector<float>* v) {
    if (i != 1) return;
    for (size_t k = 0; k < v->size(); ++k) {
      float& x = (*v)[k];
      if (logistic) x = 0.5f * (x + 1);              // targets in [0, 1]
      if (mae) x = k % 2 ? 2.0f + x : -2.0f + x;      // far from data: no kink
    }
  };
  c.reference = [logistic](const HostArrays& in, const HostArrays&) {
    std::vector<float> out(in[0]);
    if (logistic) {
      for (float& x : out) x = 1 / (1 + std::exp(-x));
    }
    return HostArrays{out};
  };
  // The loss whose gradient MXNet's backward is, per output, averaged over
  // the outputs of a sample.
  const double scale = grad_scale / static_cast<double>(label.Size() / label[0]);
  c.loss = [=](const HostArrays& out, const HostArrays& in) {
    double total = 0;
    for (size_t i = 0; i < out[0].size(); ++i) {
      const double y = out[0][i], l = in[1][i];
      if (logistic) {
        total -= l * std::log(y) + (1 - l) * std::log(1 - y);
      } else if (mae) {
        total += std::fabs(y - l);
      } else {
        total += 0.5 * (y - l) * (y - l);
      }
    }
    return scale * total;
  };
  return c;
}

MX_OP_CASE(Regression("LinearRegressionOutput", "LinearRegressionOutput", Shape{4, 3},
                      Shape{4, 3}, 1.0f));
MX_OP_CASE(Regression("LinearRegressionOutput_column_scaled", "LinearRegressionOutput",
                      Shape{5, 1}, Shape{5}, 2.5f));
MX_OP_CASE(Regression("LogisticRegressionOutput", "LogisticRegressionOutput", Shape{4, 3},
                      Shape{4, 3}, 1.0f));
MX_OP_CASE(Regression("LogisticRegressionOutput_4d", "LogisticRegressionOutput",
                      Shape{2, 2, 2, 2}, Shape{2, 2, 2, 2}, 0.5f));
MX_OP_CASE(Regression("MAERegressionOutput", "MAERegressionOutput", Shape{4, 3}, Shape{4, 3},
                      1.0f));

// ---- SoftmaxActivation

OpCase SoftmaxAct(const char* name, const char* mode, Shape data) {
  OpCase c;
  c.name = name;
  c.op = "SoftmaxActivation";
  c.params = {{"mode", mode}};
  c.inputs = {data};
  const bool channel = std::string(mode) == "channel";
  c.reference = [=](const HostArrays& in, const HostArrays&) {
    // Softmax over classes at stride `inner`.
    const int64_t classes = channel ? data[1] : data[data.ndim() - 1];
    int64_t inner = 1;
    for (int d = 2; channel && d < data.ndim(); ++d) inner *= data[d];
    const int64_t outer = data.Size() / (classes * inner);
    std::vector<float> out(in[0].size());
    for (int64_t o = 0; o < outer; ++o) {
      for (int64_t i = 0; i < inner; ++i) {
        auto at = [&](int64_t k) { return (o * classes + k) * inner + i; };
        double sum = 0;
        for (int64_t k = 0; k < classes; ++k) sum += std::exp(in[0][at(k)]);
        for (int64_t k = 0; k < classes; ++k) out[at(k)] = std::exp(in[0][at(k)]) / sum;
      }
    }
    return HostArrays{out};
  };
  return c;
}

MX_OP_CASE(SoftmaxAct("SoftmaxActivation_instance", "instance", Shape{3, 5}));
MX_OP_CASE(SoftmaxAct("SoftmaxActivation_instance_3d", "instance", Shape{2, 3, 4}));
MX_OP_CASE(SoftmaxAct("SoftmaxActivation_channel", "channel", Shape{2, 3, 2, 2}));

// ---- Embedding

OpCase Embed(const char* name, std::vector<float> indices, Shape data, int64_t input_dim,
             int64_t output_dim) {
  OpCase c;
  c.name = name;
  c.op = "Embedding";
  c.params = {{"input_dim", input_dim}, {"output_dim", output_dim}};
  c.inputs = {data, Shape{input_dim, output_dim}};
  c.no_grad = {0};
  c.init = [indices](int i, std::vector<float>* v) {
    if (i == 0) *v = indices;
  };
  c.reference = [=](const HostArrays& in, const HostArrays&) {
    std::vector<float> out;
    for (float index : in[0]) {
      // MXNet clips: below 0 reads row 0, past the end the last row.
      const int64_t row = std::clamp<int64_t>(static_cast<int64_t>(std::max(index, 0.0f)), 0,
                                              input_dim - 1);
      for (int64_t k = 0; k < output_dim; ++k) out.push_back(in[1][row * output_dim + k]);
    }
    return HostArrays{out};
  };
  return c;
}

MX_OP_CASE(Embed("Embedding", {0, 3, 1, 4, 3, 2}, Shape{2, 3}, 5, 4));
MX_OP_CASE(Embed("Embedding_clipped_and_fractional", {-3, 7, 2.6f, 0.4f}, Shape{4}, 5, 3));

}  // namespace
}  // namespace mx::testing
