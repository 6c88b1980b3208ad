// BatchNorm, as MXNet's: data is normalised per channel (the `axis`
// dimension) over every other axis, then scaled by gamma and shifted by
// beta: out = (x - mean) / sqrt(var + eps) * gamma + beta.
//
// Statistics. In training (ctx.is_train and not use_global_stats) the
// batch mean and biased variance are used, and the auxiliary states are
// updated in the same forward: moving = moving * momentum + batch * (1 -
// momentum). (MXNet 1.x makes that update in backward, MXNet 0.x in forward;
// forward means a training pass without backward still tracks the
// statistics.) Otherwise the moving statistics are used and left alone.
// fix_gamma treats gamma as 1 and gives it a zero gradient.
//
// Outputs. With output_mean_var, outputs 1 and 2 are the mean and the
// variance that normalised the data (MXNet 1.x on CPU stores the inverse
// standard deviation there; mx stores what the name says). As in MXNet,
// their head gradients are ignored.
//
// Backward recomputes the batch statistics from the data (there are no
// hidden outputs to keep them in). With xhat = (x - mean) * invstd:
//   training:     dx = (g - mean(g) - xhat * mean(g * xhat)) * gamma * invstd
//   global stats: dx = g * gamma * invstd
//   dgamma = sum(g * xhat) (0 with fix_gamma), dbeta = sum(g).
#include <cmath>
#include <vector>

#include "graph/ops/op_util.h"

namespace mx::ops {
namespace {

// Data viewed as (outer, channels, inner) around the channel axis.
struct Layout {
  int64_t outer = 1, channels = 1, inner = 1;
  int64_t PerChannel() const { return outer * inner; }
};

Layout GetLayout(const ParsedParams& p, const Shape& data) {
  int axis = static_cast<int>(p.GetInt("axis"));
  if (axis < 0) axis += data.ndim();
  Layout l;
  for (int d = 0; d < data.ndim(); ++d) {
    if (d < axis) l.outer *= data[d];
    if (d == axis) l.channels = data[d];
    if (d > axis) l.inner *= data[d];
  }
  return l;
}

// Calls f(index) for every element of channel c.
template <typename F>
void ForChannel(const Layout& l, int64_t c, F f) {
  for (int64_t o = 0; o < l.outer; ++o) {
    const int64_t base = (o * l.channels + c) * l.inner;
    for (int64_t i = 0; i < l.inner; ++i) f(base + i);
  }
}

// Batch mean and biased variance of every channel.
void BatchMoments(const float* x, const Layout& l, std::vector<float>* mean,
                  std::vector<float>* var) {
  const double n = static_cast<double>(l.PerChannel());
  for (int64_t c = 0; c < l.channels; ++c) {
    double sum = 0;
    ForChannel(l, c, [&](int64_t k) { sum += x[k]; });
    const double m = sum / n;
    double sq = 0;
    ForChannel(l, c, [&](int64_t k) { sq += (x[k] - m) * (x[k] - m); });
    (*mean)[c] = static_cast<float>(m);
    (*var)[c] = static_cast<float>(sq / n);
  }
}

float InvStd(float var, float eps) {
  // MXNet's convention for a constant channel without eps: no scaling.
  return var + eps == 0 ? 0.0f : 1.0f / std::sqrt(var + eps);
}

absl::Status Infer(const ParsedParams& p, ShapeList* in, ShapeList* out,
                   ShapeList* aux) {
  // Every per-channel array may tell the channel count.
  int64_t channels = 0;
  for (const Shape* s : {&(*in)[1], &(*in)[2], &(*aux)[0], &(*aux)[1]}) {
    if (s->ndim() == 1 && (*s)[0] != 0) channels = (*s)[0];
  }
  Shape& data = (*in)[0];
  if (data.ndim() > 0) {
    const int64_t axis = p.GetInt("axis");
    const int a = static_cast<int>(axis < 0 ? axis + data.ndim() : axis);
    if (a < 0 || a >= data.ndim()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "axis ", axis, " is out of range for data of shape ", data.ToString()));
    }
    if (data[a] == 0) data[a] = channels;
    channels = data[a];
    MX_RETURN_IF_ERROR(MergeShape(out, 0, data, "output"));
  }
  if (channels == 0) return absl::OkStatus();
  const Shape c{channels};
  MX_RETURN_IF_ERROR(MergeShape(in, 1, c, "input gamma"));
  MX_RETURN_IF_ERROR(MergeShape(in, 2, c, "input beta"));
  MX_RETURN_IF_ERROR(MergeShape(aux, 0, c, "auxiliary state moving_mean"));
  MX_RETURN_IF_ERROR(MergeShape(aux, 1, c, "auxiliary state moving_var"));
  if (p.GetBool("output_mean_var")) {
    MX_RETURN_IF_ERROR(MergeShape(out, 1, c, "output mean"));
    MX_RETURN_IF_ERROR(MergeShape(out, 2, c, "output var"));
  }
  return absl::OkStatus();
}

bool UsesBatchStats(const OpContext& ctx, const ParsedParams& p) {
  return ctx.is_train && !p.GetBool("use_global_stats");
}

void Forward(const OpContext& ctx, const ParsedParams& p,
             const std::vector<TBlob>& in, const std::vector<OpReq>& req,
             const std::vector<TBlob>& out, const std::vector<TBlob>& aux) {
  const Layout l = GetLayout(p, in[0].shape);
  const float eps = p.GetFloat("eps");
  float* moving_mean = aux[0].data;
  float* moving_var = aux[1].data;
  std::vector<float> mean(l.channels), var(l.channels);
  if (UsesBatchStats(ctx, p)) {
    BatchMoments(in[0].data, l, &mean, &var);
    const float m = p.GetFloat("momentum");
    for (int64_t c = 0; c < l.channels; ++c) {
      moving_mean[c] = moving_mean[c] * m + mean[c] * (1 - m);
      moving_var[c] = moving_var[c] * m + var[c] * (1 - m);
    }
  } else {
    mean.assign(moving_mean, moving_mean + l.channels);
    var.assign(moving_var, moving_var + l.channels);
  }
  const bool fix_gamma = p.GetBool("fix_gamma");
  const float* x = in[0].data;
  const float* gamma = in[1].data;
  const float* beta = in[2].data;
  float* y = out[0].data;
  for (int64_t c = 0; c < l.channels; ++c) {
    const float scale = (fix_gamma ? 1.0f : gamma[c]) * InvStd(var[c], eps);
    const float m = mean[c], b = beta[c];
    ForChannel(l, c, [&](int64_t k) { Store(req[0], y + k, (x[k] - m) * scale + b); });
  }
  if (p.GetBool("output_mean_var")) {
    for (int64_t c = 0; c < l.channels; ++c) {
      Store(req[1], out[1].data + c, mean[c]);
      Store(req[2], out[2].data + c, var[c]);
    }
  }
}

void Backward(const OpContext& ctx, const ParsedParams& p,
              const std::vector<TBlob>& out_grad, const std::vector<TBlob>& in,
              const std::vector<TBlob>&, const std::vector<OpReq>& req,
              const std::vector<TBlob>& in_grad, const std::vector<TBlob>& aux) {
  const Layout l = GetLayout(p, in[0].shape);
  const float eps = p.GetFloat("eps");
  const bool batch_stats = UsesBatchStats(ctx, p);
  std::vector<float> mean(l.channels), var(l.channels);
  if (batch_stats) {
    BatchMoments(in[0].data, l, &mean, &var);
  } else {
    mean.assign(aux[0].data, aux[0].data + l.channels);
    var.assign(aux[1].data, aux[1].data + l.channels);
  }
  const bool fix_gamma = p.GetBool("fix_gamma");
  const float* x = in[0].data;
  const float* g = out_grad[0].data;
  const double n = static_cast<double>(l.PerChannel());
  for (int64_t c = 0; c < l.channels; ++c) {
    const float m = mean[c];
    const float invstd = InvStd(var[c], eps);
    double sum_g = 0, dot = 0;  // dot = sum g * (x - mean)
    ForChannel(l, c, [&](int64_t k) {
      sum_g += g[k];
      dot += static_cast<double>(g[k]) * (x[k] - m);
    });
    const float w = fix_gamma ? 1.0f : in[1].data[c];
    if (req[0] != OpReq::kNull) {
      float* dx = in_grad[0].data;
      const float iw = invstd * w;
      if (batch_stats) {
        const float mean_g = static_cast<float>(sum_g / n);
        const float proj = static_cast<float>(dot / n) * invstd * invstd;
        ForChannel(l, c, [&](int64_t k) {
          Store(req[0], dx + k, (g[k] - mean_g - (x[k] - m) * proj) * iw);
        });
      } else {
        ForChannel(l, c, [&](int64_t k) { Store(req[0], dx + k, g[k] * iw); });
      }
    }
    if (req[1] != OpReq::kNull) {
      Store(req[1], in_grad[1].data + c,
            fix_gamma ? 0.0f : static_cast<float>(dot) * invstd);
    }
    if (req[2] != OpReq::kNull) {
      Store(req[2], in_grad[2].data + c, static_cast<float>(sum_g));
    }
  }
}

OpDef Make() {
  OpDef op;
  op.name = "BatchNorm";
  op.params = {{"eps", ParamSpec::Type::kFloat, "0.001"},
               {"momentum", ParamSpec::Type::kFloat, "0.9"},
               {"fix_gamma", ParamSpec::Type::kBool, "True"},
               {"use_global_stats", ParamSpec::Type::kBool, "False"},
               {"output_mean_var", ParamSpec::Type::kBool, "False"},
               {"axis", ParamSpec::Type::kInt, "1"},
               // Accepted for MXNet symbol files; mx has no cuDNN path.
               {"cudnn_off", ParamSpec::Type::kBool, "False"}};
  op.arguments = Names({"data", "gamma", "beta"});
  op.aux_states = Names({"moving_mean", "moving_var"});
  op.outputs = [](const ParsedParams& p) {
    return p.GetBool("output_mean_var")
               ? std::vector<std::string>{"output", "mean", "var"}
               : std::vector<std::string>{"output"};
  };
  op.infer_shape = Infer;
  op.forward = Forward;
  op.backward = Backward;
  op.backward_uses_outputs = false;
  return op;
}

MX_REGISTER_OP(Make());

}  // namespace
}  // namespace mx::ops
