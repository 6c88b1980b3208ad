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
// Outputs. Outputs 1 and 2 are the mean and the variance that normalised
// the data (MXNet 1.x on CPU stores the inverse standard deviation there;
// mx stores what the name says). As in MXNet they are hidden unless
// output_mean_var, and their head gradients are ignored.
//
// Backward takes the statistics from outputs 1 and 2 (those of the
// preceding training forward), so it reads the data twice, not four times.
// With xhat = (x - mean) * invstd:
//   training:     dx = (g - mean(g) - xhat * mean(g * xhat)) * gamma * invstd
//   global stats: dx = g * gamma * invstd
//   dgamma = sum(g * xhat) (0 with fix_gamma), dbeta = sum(g).
#include <algorithm>
#include <vector>

#include "graph/ops/op_util.h"
#include "ndarray/launch.h"
#include "ndarray/nn_kernels.h"

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
  MX_RETURN_IF_ERROR(MergeShape(out, 1, c, "output mean"));
  MX_RETURN_IF_ERROR(MergeShape(out, 2, c, "output var"));
  return absl::OkStatus();
}

bool UsesBatchStats(const OpContext& ctx, const ParsedParams& p) {
  return ctx.is_train && !p.GetBool("use_global_stats");
}

// The kernels' view of data laid out as `blob` is (row-major, or blocked).
kernel::BnLayout KernelLayout(const Layout& l, const TBlob& blob) {
  return {l.outer, l.channels, l.inner, blob.blocked ? kernel::kChannelBlock : 1};
}

// Blocked data and output where the channels are axis 1 of 4-D data and
// fill whole blocks (kernel::BnLayout).
BlockedIo Blocked(const ParsedParams& p, const ShapeList& in, const ShapeList&) {
  const Shape& data = in[0];
  const int64_t axis = p.GetInt("axis");
  if (data.ndim() != 4 || (axis != 1 && axis != -3) || data[1] % kernel::kChannelBlock != 0) {
    return {};
  }
  return {{0}, {0}, /*uniform=*/true};
}

// Slices per channel for the partial sums: about 512 elements each, at most
// 1024 (ndarray/nn_kernels.h).
int64_t Parts(const Layout& l) {
  return std::clamp<int64_t>((l.PerChannel() + 511) / 512, 1, 1024);
}

// The workspace: the partial sums (2 doubles per channel and part), then
// the per-channel table.
struct Scratch {
  double* partials;
  float* table;
  int64_t parts;
};
Scratch GetScratch(float* workspace, const Layout& l) {
  const int64_t parts = Parts(l);
  double* partials = reinterpret_cast<double*>(workspace);
  return {partials, reinterpret_cast<float*>(partials + 2 * l.channels * parts), parts};
}

size_t WorkspaceBytes(const ParsedParams& p, const ShapeList& in, const ShapeList&, Context) {
  const Layout l = GetLayout(p, in[0]);
  return static_cast<size_t>(2 * l.channels * Parts(l)) * sizeof(double) +
         static_cast<size_t>(kernel::kBnColumns * l.channels) * sizeof(float);
}

// Sums `what` over every channel's slices into the partials. Each index
// is a slice of about 512 elements, which tells Launch to split the sums
// over the CPU pool (ResNet's: 16 channels of 100 x 28 x 28).
// (Blocked: an index per block of 16 channels and slice.)
void SumParts(const OpContext& ctx, const Scratch& s, const kernel::BnLayout& l, kernel::BnSum what,
              const float* x, const float* g, const float* center) {
  kernel::Launch<kernel::BnPartsKernel>("BatchNorm", ctx.ctx, l.Groups() * s.parts,
                                        {s.partials, x, g, center, l, s.parts, what},
                                        /*split=*/true,
                                        /*index_cost=*/l.PerChannel() * l.block / s.parts);
}

// The batch mean and variance into the table, in one pass over x.
void BatchMoments(const OpContext& ctx, const Scratch& s, const kernel::BnLayout& l,
                  const float* x) {
  SumParts(ctx, s, l, kernel::kBnMoments, x, nullptr, nullptr);
  kernel::Launch<kernel::BnMomentsKernel>("BatchNorm", ctx.ctx, l.channels,
                                          {s.table, s.partials, l, s.parts});
}

void Forward(const OpContext& ctx, const ParsedParams& p,
             const std::vector<TBlob>& in, const std::vector<OpReq>& req,
             const std::vector<TBlob>& out, const std::vector<TBlob>& aux) {
  const Layout l = GetLayout(p, in[0].shape);
  const kernel::BnLayout kl = KernelLayout(l, in[0]);
  const Scratch scratch = GetScratch(ctx.workspace, l);
  const bool batch_stats = UsesBatchStats(ctx, p);
  if (batch_stats) BatchMoments(ctx, scratch, kl, in[0].data);
  auto output = [&](size_t i) { return req[i] != OpReq::kNull ? out[i].data : nullptr; };
  kernel::BnStatsKernel::Params stats{
      scratch.table, aux[0].data, aux[1].data, output(1), output(2), in[1].data, l.channels,
      p.GetFloat("eps"), p.GetFloat("momentum"), batch_stats, p.GetBool("fix_gamma"),
      req[1] == OpReq::kAdd, req[2] == OpReq::kAdd};
  kernel::Launch<kernel::BnStatsKernel>("BatchNorm", ctx.ctx, l.channels, stats);
  if (req[0] == OpReq::kNull) return;
  kernel::Launch<kernel::BnApplyKernel>(
      "BatchNorm", ctx.ctx, in[0].Size(),
      {out[0].data, in[0].data, scratch.table, in[2].data, kl, req[0] == OpReq::kAdd});
}

void Backward(const OpContext& ctx, const ParsedParams& p,
              const std::vector<TBlob>& out_grad, const std::vector<TBlob>& in,
              const std::vector<TBlob>& out, const std::vector<OpReq>& req,
              const std::vector<TBlob>& in_grad, const std::vector<TBlob>&) {
  const Layout l = GetLayout(p, in[0].shape);
  const kernel::BnLayout kl = KernelLayout(l, in[0]);
  const Scratch scratch = GetScratch(ctx.workspace, l);
  const bool batch_stats = UsesBatchStats(ctx, p);
  // Forward's statistics: the batch's, or with global stats the moving ones.
  const float* mean = out[1].data;
  const float* var = out[2].data;
  SumParts(ctx, scratch, kl, kernel::kBnSumGrad, in[0].data, out_grad[0].data, mean);
  auto grad = [&](size_t i) { return req[i] != OpReq::kNull ? in_grad[i].data : nullptr; };
  kernel::BnGradStatsKernel::Params stats{scratch.table,
                                          grad(1),
                                          grad(2),
                                          scratch.partials,
                                          in[1].data,
                                          mean,
                                          var,
                                          kl,
                                          scratch.parts,
                                          p.GetFloat("eps"),
                                          batch_stats,
                                          p.GetBool("fix_gamma"),
                                          req[1] == OpReq::kAdd,
                                          req[2] == OpReq::kAdd};
  kernel::Launch<kernel::BnGradStatsKernel>("BatchNorm", ctx.ctx, l.channels, stats);
  if (req[0] == OpReq::kNull) return;
  kernel::Launch<kernel::BnGradApplyKernel>(
      "BatchNorm", ctx.ctx, in[0].Size(),
      {in_grad[0].data, out_grad[0].data, in[0].data, scratch.table, kl, req[0] == OpReq::kAdd});
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
               // Accepted for MXNet symbol files; mx has no cuDNN batch norm.
               {"cudnn_off", ParamSpec::Type::kBool, "False"}};
  op.arguments = Names({"data", "gamma", "beta"});
  op.aux_states = Names({"moving_mean", "moving_var"});
  op.outputs = Names({"output", "mean", "var"});
  op.num_visible_outputs = [](const ParsedParams& p) {
    return p.GetBool("output_mean_var") ? 3 : 1;
  };
  op.infer_shape = Infer;
  op.forward = Forward;
  op.backward = Backward;
  op.backward_uses_outputs = OpDef::OutputUse::kAllButFirst;  // the statistics
  op.workspace = WorkspaceBytes;
  op.blocked = Blocked;
  op.gpu = true;  // through the kernel layer
  return op;
}

MX_REGISTER_OP(Make());

}  // namespace
}  // namespace mx::ops
