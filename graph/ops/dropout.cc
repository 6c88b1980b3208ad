// Dropout, as MXNet's: in training (or always, with mode="always") every
// element is kept with probability 1 - p and scaled by 1 / (1 - p), or
// zeroed; otherwise the operator is the identity. `axes` shares one draw
// along the given axes (variational dropout), as MXNet's does.
//
// The mask is a second, hidden output (as in MXNet): forward writes the
// factor of every element (1 / (1 - p) or 0) there and backward multiplies
// the gradient by it.
#include <cstdint>
#include <algorithm>
#include <vector>

#include "graph/ops/op_util.h"
#include "ndarray/launch.h"

namespace mx::ops {
namespace {

// Calls f(i, factor) for every element i of data, with factor the mask
// value: 1 / (1 - p) for kept elements, 0 for dropped ones.
template <typename F>
void ForEachMasked(const ParsedParams& p, const Shape& data, uint64_t seed,
                   F f) {
  const float keep = 1.0f - p.GetFloat("p");
  const float scale = keep > 0 ? 1.0f / keep : 0.0f;
  // The mask has data's shape with the shared axes set to 1.
  Shape mask = data;
  for (int64_t axis : p.GetShape("axes")) {
    mask[static_cast<int>(axis < 0 ? axis + data.ndim() : axis)] = 1;
  }
  // Element m of the mask draws from Philox (ndarray/kernel.h) at (seed, m),
  // independent of the others and of the order of evaluation.
  const kernel::BroadcastIndex ix = kernel::MakeBroadcastIndex("Dropout", data, mask, mask);
  kernel::ForEachBroadcast(ix, 0, data.Size(), [&](int64_t i, int64_t m, int64_t) {
    f(i, kernel::UnitFloat(kernel::PhiloxAt(seed, m).v[0]) < keep ? scale : 0.0f);
  });
}

absl::Status Infer(const ParsedParams& p, ShapeList* in, ShapeList* out,
                   ShapeList* aux) {
  const float prob = p.GetFloat("p");
  if (!(prob >= 0 && prob <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("p=", prob, " is not a probability in [0, 1]"));
  }
  MX_RETURN_IF_ERROR(SameShapeInfer(p, in, out, aux));
  const Shape& data = (*in)[0];
  if (data.ndim() == 0) return absl::OkStatus();
  for (int64_t axis : p.GetShape("axes")) {
    if (axis < -data.ndim() || axis >= data.ndim()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "axes: axis ", axis, " is out of range for data of shape ",
          data.ToString()));
    }
  }
  return absl::OkStatus();
}

void Forward(const OpContext& ctx, const ParsedParams& p,
             const std::vector<TBlob>& in, const std::vector<OpReq>& req,
             const std::vector<TBlob>& out, const std::vector<TBlob>&) {
  const bool active = (ctx.is_train || p.GetString("mode") == "always") && p.GetFloat("p") > 0;
  const float* x = in[0].data;
  float* y = out[0].data;
  float* mask = out[1].data;
  const int64_t n = out[0].Size();
  if (!active) {
    MapStore(req[0], x, y, n, [](float v) { return v; });
    std::fill(mask, mask + n, 1.0f);
    return;
  }
  ForEachMasked(p, in[0].shape, ctx.seed, [&](int64_t i, float factor) {
    mask[i] = factor;
    Store(req[0], y + i, x[i] * factor);
  });
}

void Backward(const OpContext&, const ParsedParams&,
              const std::vector<TBlob>& out_grad, const std::vector<TBlob>&,
              const std::vector<TBlob>& out, const std::vector<OpReq>& req,
              const std::vector<TBlob>& in_grad, const std::vector<TBlob>&) {
  const float* g = out_grad[0].data;
  const float* mask = out[1].data;
  float* gi = in_grad[0].data;
  const int64_t n = out_grad[0].Size();
  for (int64_t i = 0; i < n; ++i) Store(req[0], gi + i, g[i] * mask[i]);
}

OpDef Make() {
  OpDef op;
  op.name = "Dropout";
  op.params = {{"p", ParamSpec::Type::kFloat, "0.5"},
               {"mode", ParamSpec::Type::kString, "training", false,
                {"training", "always"}},
               {"axes", ParamSpec::Type::kShape, "()"},
               // Accepted for MXNet symbol files; mx has no cuDNN path.
               {"cudnn_off", ParamSpec::Type::kBool, "False"}};
  op.outputs = Names({"output", "mask"});
  op.num_visible_outputs = [](const ParsedParams&) { return 1; };
  op.infer_shape = Infer;
  op.forward = Forward;
  op.backward = Backward;
  op.backward_uses_inputs = false;
  op.backward_uses_outputs = true;  // the mask
  return op;
}

MX_REGISTER_OP(Make());

}  // namespace
}  // namespace mx::ops
