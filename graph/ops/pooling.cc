// Pooling (2-D, NCHW), as MXNet's: max, avg or sum over windows of `kernel`
// moved by `stride` over the data padded by `pad`; global_pool pools each
// whole plane to 1x1. The output extent is 1 + (H + 2 * pad - kernel) /
// stride, rounded down (pooling_convention=valid) or up (full).
//
// Padding is never a value: max takes the maximum of the real elements of
// a window, sum adds them. avg divides the sum by the window's size clipped
// to the padded data (count_include_pad=True, MXNet's default) or by the
// number of real elements (False). Backward sends a max window's gradient
// to its first maximum in row-major order, and spreads avg and sum windows'
// gradients as the forward weighed them. On GPUs the operator calls cuDNN
// (max and avg, valid convention), whose max backward may pick another of
// tied maxima, and the kernel layer for the rest (below).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "graph/ops/op_util.h"
#include "graph/ops/window2d.h"
#include "ndarray/dnn.h"
#include "ndarray/launch.h"
#include "ndarray/nn_kernels.h"
#include "ndarray/parallel.h"

namespace mx::ops {
namespace {

// The kernel layer's (ndarray/nn_kernels.h), which both paths share.
using PoolType = kernel::PoolWindows::Type;

// The window with global_pool applied: the whole plane, no padding.
absl::StatusOr<Window2D> ParseWindow(const ParsedParams& p, const Shape& data) {
  Window2D w;
  if (p.GetBool("global_pool")) {
    if (data.ndim() == 4) {
      w.kernel[0] = data[2];
      w.kernel[1] = data[3];
    }
    return w;
  }
  const Shape kernel = p.GetShape("kernel");
  if (kernel.ndim() != 2) {
    return absl::UnimplementedError(absl::StrCat(
        "parameter kernel=", kernel.ToString(), " has ", kernel.ndim(),
        " dimensions; only 2-D pooling (kernel=(kh, kw)) is supported, or "
        "global_pool=True"));
  }
  MX_RETURN_IF_ERROR(Get2D(p, "kernel", 1, w.kernel));
  MX_RETURN_IF_ERROR(Get2D(p, "stride", 1, w.stride));
  MX_RETURN_IF_ERROR(Get2D(p, "pad", 0, w.pad));
  return w;
}

PoolType TypeOf(const ParsedParams& p) {
  const std::string& t = p.GetString("pool_type");
  return t == "max" ? PoolType::kMax : t == "avg" ? PoolType::kAvg : PoolType::kSum;
}

absl::Status Infer(const ParsedParams& p, ShapeList* in, ShapeList* out,
                   ShapeList*) {
  const Shape& data = (*in)[0];
  if (data.ndim() != 0 && data.ndim() != 4) {
    return absl::InvalidArgumentError(absl::StrCat(
        "input data must be 4-D (batch, channel, height, width), but has shape ",
        data.ToString()));
  }
  MX_ASSIGN_OR_RETURN(Window2D w, ParseWindow(p, data));
  if (data.ndim() == 0) return absl::OkStatus();
  if (data[2] > std::numeric_limits<int32_t>::max()) {  // the max backward's row index
    return absl::InvalidArgumentError(absl::StrCat("input data of shape ", data.ToString(),
                                                   " is higher than 2^31 - 1 rows"));
  }
  const bool full = p.GetString("pooling_convention") == "full";
  Shape o{data[0], data[1], 0, 0};
  if (p.GetBool("global_pool")) {
    o[2] = o[3] = 1;
    return MergeShape(out, 0, o, "output");
  }
  for (int d = 0; d < 2; ++d) {
    const int64_t size = data[2 + d];
    if (size == 0) continue;
    if (size + 2 * w.pad[d] < w.kernel[d]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "kernel (", w.kernel[0], ",", w.kernel[1],
          ") does not fit in input data of shape ", data.ToString(), " padded by (",
          w.pad[0], ",", w.pad[1], ")"));
    }
    o[2 + d] = WindowOutput(w, d, size, full);
  }
  return MergeShape(out, 0, o, "output");
}

// What the kernels need to know about one pooling, with the per-position
// quantities precomputed.
struct Geometry {
  Window2D win;
  PoolType type;
  int64_t planes, height, width, out_h, out_w;
  // For kernel column kx, the output columns whose window reads a real
  // input column there: [x_lo[kx], x_hi[kx]).
  std::vector<int64_t> x_lo, x_hi;
  // avg: 1 / divisor per output element of a plane (the divisor is the
  // product of the window's extents along y and x: PoolWindows::InvDivisor).
  std::vector<float> inv_divisor;

  // The real input rows [*y0, *y1) of output row oy's windows.
  void Rows(int64_t oy, int64_t* y0, int64_t* y1) const {
    const int64_t start = oy * win.stride[0] - win.pad[0];
    *y0 = std::max<int64_t>(start, 0);
    *y1 = std::min(start + win.kernel[0], height);
  }
};

// The windows as the kernel layer's PoolKernel and PoolGradKernel take
// them; the CPU code takes avg's divisors from it too.
kernel::PoolWindows KernelWindows(const ParsedParams& p, const Shape& data, const Shape& out) {
  const Window2D w = *ParseWindow(p, data);
  return {data[2],
          data[3],
          out[2],
          out[3],
          {w.kernel[0], w.kernel[1]},
          {w.stride[0], w.stride[1]},
          {w.pad[0], w.pad[1]},
          TypeOf(p),
          p.GetBool("count_include_pad")};
}

Geometry MakeGeometry(const ParsedParams& p, const Shape& data, const Shape& out) {
  Geometry g;
  g.win = *ParseWindow(p, data);
  g.type = TypeOf(p);
  g.planes = data[0] * data[1];
  g.height = data[2];
  g.width = data[3];
  g.out_h = out[2];
  g.out_w = out[3];
  for (int64_t kx = 0; kx < g.win.kernel[1]; ++kx) {
    int64_t lo, hi;
    ValidRange(kx - g.win.pad[1], g.win.stride[1], g.width, g.out_w, &lo, &hi);
    g.x_lo.push_back(lo);
    g.x_hi.push_back(hi);
  }
  if (g.type == PoolType::kAvg) {
    const kernel::PoolWindows w = KernelWindows(p, data, out);
    for (int64_t oy = 0; oy < g.out_h; ++oy) {
      for (int64_t ox = 0; ox < g.out_w; ++ox) g.inv_divisor.push_back(w.InvDivisor(oy, ox));
    }
  }
  return g;
}

// The kernels are separable: a window's max (or sum) is the max over its
// columns of the max over its rows. Per output row, the rows are first
// reduced into one input-wide row (contiguous, vectorized), which the
// columns of each window then reduce.

// Runs fn(begin, end) over ranges of planes (image x channel) on the CPU
// pool; planes are independent. With kLanes = kernel::kChannelBlock, over
// ranges of blocks of blocked data (an image's 16 channels, their planes
// interleaved).
template <int64_t kLanes = 1, typename Fn>
void ForEachPlaneRange(const Geometry& g, Fn fn) {
  // Ranges of at least 64 KiB of input.
  const int64_t unit_floats = std::max<int64_t>(g.height * g.width * kLanes, 1);
  ParallelRanges(g.planes / kLanes, std::max<int64_t>(1, (16 << 10) / unit_floats), fn);
}

// Forward of one output row: col[ix] reduces input rows [y0, y1) of
// column ix; out[ox] reduces col over the window's columns.
void ForwardRow(const Geometry& g, const float* x, int64_t oy, float* col, float* out) {
  const bool max = g.type == PoolType::kMax;
  const float init = max ? std::numeric_limits<float>::lowest() : 0.0f;
  int64_t y0, y1;
  g.Rows(oy, &y0, &y1);
  std::fill(col, col + g.width, init);
  for (int64_t iy = y0; iy < y1; ++iy) {
    const float* r = x + iy * g.width;
    if (max) {
      for (int64_t ix = 0; ix < g.width; ++ix) col[ix] = std::max(col[ix], r[ix]);
    } else {
      for (int64_t ix = 0; ix < g.width; ++ix) col[ix] += r[ix];
    }
  }
  std::fill(out, out + g.out_w, init);
  const int64_t sx = g.win.stride[1];
  for (int64_t kx = 0; kx < g.win.kernel[1]; ++kx) {
    const float* c = col + kx - g.win.pad[1];
    if (max) {
      for (int64_t ox = g.x_lo[kx]; ox < g.x_hi[kx]; ++ox) out[ox] = std::max(out[ox], c[ox * sx]);
    } else {
      for (int64_t ox = g.x_lo[kx]; ox < g.x_hi[kx]; ++ox) out[ox] += c[ox * sx];
    }
  }
  if (g.type == PoolType::kAvg) {
    const float* inv = g.inv_divisor.data() + oy * g.out_w;
    for (int64_t ox = 0; ox < g.out_w; ++ox) out[ox] *= inv[ox];
  }
}

// ---- Max pooling over 2x2 windows with stride 2 and no padding (LeNet's,
// VGG's): each window is two columns of two rows, so a plane's row pair is
// done in loops over the pair that the compiler vectorizes, and the
// backward writes every input gradient once (the gradient or 0) instead of
// clearing the plane and adding into it. In LeNet's step on this 2-core
// machine: forward 0.64-0.96 -> 0.24-0.26 ms, backward 1.36-1.56 -> 0.43-0.52
// ms for the first pooling. Same results as the general
// kernels, NaNs and ties included: the std::max order of ForwardRow, and
// MaxBackwardRow's choice of the first maximum in row-major order.

bool IsMax2x2Stride2(const Geometry& g) {
  return g.type == PoolType::kMax && g.win.kernel[0] == 2 && g.win.kernel[1] == 2 &&
         g.win.stride[0] == 2 && g.win.stride[1] == 2 && g.win.pad[0] == 0 &&
         g.win.pad[1] == 0 && 2 * g.out_h <= g.height && 2 * g.out_w <= g.width;
}

// kLanes: 1 for a row-major plane; kernel::kChannelBlock for a block of
// blocked data (its 16 channels' planes interleaved), each channel then
// getting the same comparisons as in its own plane.
template <bool kAdd, int64_t kLanes = 1>
void Max2x2ForwardPlane(const Geometry& g, const float* x, float* y) {
  constexpr float kLow = std::numeric_limits<float>::lowest();
  const int64_t width = g.width * kLanes, out_w = g.out_w;
  for (int64_t oy = 0; oy < g.out_h; ++oy) {
    const float* __restrict r0 = x + 2 * oy * width;
    const float* __restrict r1 = r0 + width;
    float* __restrict out = y + oy * out_w * kLanes;
    for (int64_t ox = 0; ox < out_w; ++ox) {
      for (int64_t c = 0; c < kLanes; ++c) {
        const int64_t l = 2 * ox * kLanes + c, r = l + kLanes;
        const float c0 = std::max(std::max(kLow, r0[l]), r1[l]);
        const float c1 = std::max(std::max(kLow, r0[r]), r1[r]);
        const float m = std::max(std::max(kLow, c0), c1);
        out[ox * kLanes + c] = kAdd ? out[ox * kLanes + c] + m : m;
      }
    }
  }
}

// Scratch of one row pair, 2 * out_w (times the lanes) each: per input
// column the larger of its two rows and whether that is the lower one,
// then the gradient it receives if its row wins.
struct Max2x2Scratch {
  explicit Max2x2Scratch(int64_t n) : col(n), down(n), grad(n) {}
  std::vector<float> col;
  std::vector<int32_t> down;
  std::vector<float> grad;
};

// In three passes over a row pair that the compiler vectorizes (one
// window-wise loop with its selections did not: it branched on the data).
// kLanes as for Max2x2ForwardPlane.
template <bool kAdd, int64_t kLanes = 1>
void Max2x2BackwardPlane(const Geometry& g, const float* x, const float* gy, float* gx,
                         Max2x2Scratch* scratch) {
  const int64_t width = g.width * kLanes, out_w = g.out_w, n = 2 * out_w * kLanes;
  float* __restrict col = scratch->col.data();
  int32_t* __restrict down = scratch->down.data();
  float* __restrict sel = scratch->grad.data();
  for (int64_t oy = 0; oy < g.out_h; ++oy) {
    const float* __restrict r0 = x + 2 * oy * width;
    const float* __restrict r1 = r0 + width;
    const float* __restrict grad = gy + oy * out_w * kLanes;
    float* __restrict g0 = gx + 2 * oy * width;
    float* __restrict g1 = g0 + width;
    // Per column: the larger row, the upper one on a tie.
    for (int64_t ix = 0; ix < n; ++ix) {
      const int32_t d = r1[ix] > r0[ix];
      col[ix] = d ? r1[ix] : r0[ix];
      down[ix] = d;
    }
    // Per window: the larger column; on a tie the one whose maximum is in
    // the upper row, then the left one.
    for (int64_t ox = 0; ox < out_w; ++ox) {
      for (int64_t c = 0; c < kLanes; ++c) {
        const int64_t l = 2 * ox * kLanes + c, r = l + kLanes;
        const float c0 = col[l], c1 = col[r];
        const int32_t d0 = down[l], d1 = down[r];
        const int32_t right = (c1 > c0) | ((c1 == c0) & d0 & (d1 ^ 1));
        const float v = grad[ox * kLanes + c];
        sel[l] = right ? 0.0f : v;
        sel[r] = right ? v : 0.0f;
      }
    }
    for (int64_t ix = 0; ix < n; ++ix) {
      const float v0 = down[ix] ? 0.0f : sel[ix], v1 = down[ix] ? sel[ix] : 0.0f;
      g0[ix] = kAdd ? g0[ix] + v0 : v0;
      g1[ix] = kAdd ? g1[ix] + v1 : v1;
    }
    // An odd width's last column is in no window.
    if (!kAdd) std::fill(g0 + n, g0 + width, 0.0f);
    if (!kAdd) std::fill(g1 + n, g1 + width, 0.0f);
  }
  // And so is an odd height's last row.
  if (!kAdd) std::fill(gx + 2 * g.out_h * width, gx + g.height * width, 0.0f);
}

// ---- Blocked data (TBlob::blocked): global avg and sum pooling (the
// output row-major) with ForwardRow's and SumBackwardRow's arithmetic in
// the same order (rows into a row, then its columns), and max pooling over
// 2x2 windows with stride 2 (blocked to blocked) with Max2x2*Plane's
// comparisons; each for a block's 16 channels at once, so both layouts
// give the same bits.

constexpr int64_t kBlock = kernel::kChannelBlock;

BlockedIo Blocked(const ParsedParams& p, const ShapeList& in, const ShapeList& out) {
  if (in[0].ndim() != 4 || in[0][1] % kBlock != 0) return {};
  if (p.GetBool("global_pool") && TypeOf(p) != PoolType::kMax) return {{0}, {}, false};
  if (IsMax2x2Stride2(MakeGeometry(p, in[0], out[0]))) return {{0}, {0}, /*uniform=*/true};
  return {};
}

void BlockedGlobalForward(const Geometry& g, const float* x, OpReq req, float* y) {
  const int64_t plane = g.height * g.width;
  ForEachPlaneRange<kBlock>(g, [&](int64_t begin, int64_t end) {
    std::vector<float> col(g.width * kBlock);
    for (int64_t b = begin; b < end; ++b) {
      const float* in = x + b * plane * kBlock;
      std::fill(col.begin(), col.end(), 0.0f);
      for (int64_t i = 0; i < plane * kBlock; i += g.width * kBlock) {
        for (int64_t k = 0; k < g.width * kBlock; ++k) col[k] += in[i + k];
      }
      float sum[kBlock] = {};
      for (int64_t ix = 0; ix < g.width; ++ix) {
        for (int64_t c = 0; c < kBlock; ++c) sum[c] += col[ix * kBlock + c];
      }
      for (int64_t c = 0; c < kBlock; ++c) {
        const float v = g.type == PoolType::kAvg ? sum[c] * g.inv_divisor[0] : sum[c];
        Store(req, y + b * kBlock + c, v);
      }
    }
  });
}

void BlockedGlobalBackward(const Geometry& g, const float* gy, OpReq req, float* gx) {
  const int64_t plane = g.height * g.width;
  ForEachPlaneRange<kBlock>(g, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float share[kBlock];
      for (int64_t c = 0; c < kBlock; ++c) {
        const float v =
            g.type == PoolType::kAvg ? gy[b * kBlock + c] * g.inv_divisor[0] : gy[b * kBlock + c];
        share[c] = 0.0f + v;  // SumBackwardRow's column, 0 + v (-0 becomes +0)
      }
      float* out = gx + b * plane * kBlock;
      for (int64_t i = 0; i < plane * kBlock; i += kBlock) {
        for (int64_t c = 0; c < kBlock; ++c) {
          out[i + c] = (req == OpReq::kAdd ? out[i + c] : 0.0f) + share[c];
        }
      }
    }
  });
}

// Max pooling over 2x2 windows with stride 2 of every plane (kLanes 1) or
// block of blocked data (kernel::kChannelBlock).
template <int64_t kLanes>
void Max2x2Forward(const Geometry& g, const float* x, OpReq req, float* y) {
  const int64_t in_unit = g.height * g.width * kLanes, out_unit = g.out_h * g.out_w * kLanes;
  ForEachPlaneRange<kLanes>(g, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const float* in = x + u * in_unit;
      float* out = y + u * out_unit;
      req == OpReq::kAdd ? Max2x2ForwardPlane<true, kLanes>(g, in, out)
                         : Max2x2ForwardPlane<false, kLanes>(g, in, out);
    }
  });
}

template <int64_t kLanes>
void Max2x2Backward(const Geometry& g, const float* x, const float* gy, OpReq req, float* gx) {
  const int64_t in_unit = g.height * g.width * kLanes, out_unit = g.out_h * g.out_w * kLanes;
  ForEachPlaneRange<kLanes>(g, [&](int64_t begin, int64_t end) {
    Max2x2Scratch scratch(2 * g.out_w * kLanes);
    for (int64_t u = begin; u < end; ++u) {
      const float* in = x + u * in_unit;
      const float* grad = gy + u * out_unit;
      float* out = gx + u * in_unit;
      req == OpReq::kAdd ? Max2x2BackwardPlane<true, kLanes>(g, in, grad, out, &scratch)
                         : Max2x2BackwardPlane<false, kLanes>(g, in, grad, out, &scratch);
    }
  });
}

// ---- On GPUs: cuDNN (ndarray/dnn.h) for max and avg pooling with the
// valid convention, the kernel layer's PoolKernel and PoolGradKernel
// (ndarray/nn_kernels.h) for the rest and with cudnn_off=True (MXNet's
// switch to its own kernels; these also keep the CPU's rule for tied
// maxima, which cuDNN's max backward does not).
bool UsesCudnn(const ParsedParams& p) {
  return !p.GetBool("cudnn_off") && TypeOf(p) != PoolType::kSum &&
         (p.GetString("pooling_convention") == "valid" || p.GetBool("global_pool"));
}

kernel::PoolShape CudnnShape(const ParsedParams& p, const Shape& data, const Shape& out) {
  const PoolType type = TypeOf(p);
  const Window2D w = *ParseWindow(p, data);
  using Mode = kernel::PoolShape::Mode;
  const Mode mode = type == PoolType::kMax          ? Mode::kMax
                    : p.GetBool("count_include_pad") ? Mode::kAvgIncludePad
                                                     : Mode::kAvgExcludePad;
  return {data[0], data[1], data[2], data[3], {w.kernel[0], w.kernel[1]},
          {w.pad[0], w.pad[1]}, {w.stride[0], w.stride[1]}, out[2], out[3], mode};
}

float Beta(OpReq req) { return req == OpReq::kAdd ? 1.0f : 0.0f; }

void Forward(const OpContext& ctx, const ParsedParams& p, const std::vector<TBlob>& in,
             const std::vector<OpReq>& req, const std::vector<TBlob>& out,
             const std::vector<TBlob>&) {
  if (req[0] == OpReq::kNull) return;
  if (ctx.ctx.is_gpu() && UsesCudnn(p)) {
    kernel::ThrowIfLaunchFailed(
        kernel::GpuPoolForward(ctx.ctx.device_id, CudnnShape(p, in[0].shape, out[0].shape),
                               in[0].data, out[0].data, Beta(req[0])),
        "Pooling", ctx.ctx);
    return;
  }
  if (ctx.ctx.is_gpu()) {
    kernel::Launch<kernel::PoolKernel>(
        "Pooling", ctx.ctx, out[0].shape.Size(),
        {out[0].data, in[0].data, KernelWindows(p, in[0].shape, out[0].shape),
         req[0] == OpReq::kAdd});
    return;
  }
  const Geometry g = MakeGeometry(p, in[0].shape, out[0].shape);
  // Blocked data is global avg or sum pooling's, or else 2x2 max's (Blocked).
  if (in[0].blocked && p.GetBool("global_pool")) {
    BlockedGlobalForward(g, in[0].data, req[0], out[0].data);
    return;
  }
  if (IsMax2x2Stride2(g)) {
    in[0].blocked ? Max2x2Forward<kBlock>(g, in[0].data, req[0], out[0].data)
                  : Max2x2Forward<1>(g, in[0].data, req[0], out[0].data);
    return;
  }
  const int64_t in_plane = g.height * g.width, out_plane = g.out_h * g.out_w;
  ForEachPlaneRange(g, [&](int64_t begin, int64_t end) {
    std::vector<float> col(g.width), row(g.out_w);
    for (int64_t pl = begin; pl < end; ++pl) {
      const float* x = in[0].data + pl * in_plane;
      float* y = out[0].data + pl * out_plane;
      for (int64_t oy = 0; oy < g.out_h; ++oy) {
        float* yr = y + oy * g.out_w;
        if (req[0] == OpReq::kWrite) {
          ForwardRow(g, x, oy, col.data(), yr);
        } else {
          ForwardRow(g, x, oy, col.data(), row.data());
          for (int64_t ox = 0; ox < g.out_w; ++ox) yr[ox] += row[ox];
        }
      }
    }
  });
}

// Max backward of one output row: routes gy[ox] to the first maximum of
// window ox in row-major order. Per column, `col` holds the maximum over
// the window's rows and `arg` the first row holding it; across columns a
// tie goes to the smaller row, then (scanning left to right) the smaller
// column.
void MaxBackwardRow(const Geometry& g, const float* x, int64_t oy, const float* gy,
                    float* __restrict col, int32_t* __restrict arg, float* gx) {
  int64_t y0, y1;
  g.Rows(oy, &y0, &y1);
  if (y0 >= y1) return;
  // Locals and restrict pointers, so that the column loop is vectorized
  // (with g's fields it reloaded g.width per element: the stores to col and
  // arg might have changed it).
  const int64_t width = g.width;
  std::copy(x + y0 * width, x + (y0 + 1) * width, col);
  std::fill(arg, arg + width, static_cast<int32_t>(y0));
  for (int64_t iy = y0 + 1; iy < y1; ++iy) {
    const float* __restrict r = x + iy * width;
    const int32_t row = static_cast<int32_t>(iy);
    for (int64_t ix = 0; ix < width; ++ix) {
      const bool larger = r[ix] > col[ix];
      col[ix] = larger ? r[ix] : col[ix];
      arg[ix] = larger ? row : arg[ix];
    }
  }
  for (int64_t ox = 0; ox < g.out_w; ++ox) {
    const int64_t start = ox * g.win.stride[1] - g.win.pad[1];
    const int64_t x0 = std::max<int64_t>(start, 0);
    const int64_t x1 = std::min(start + g.win.kernel[1], width);
    if (x0 >= x1) continue;
    // Branch-free: which column wins is data, and mispredicted.
    int64_t best = x0;
    float best_value = col[x0];
    int32_t best_row = arg[x0];
    for (int64_t ix = x0 + 1; ix < x1; ++ix) {
      const bool greater = col[ix] > best_value, equal = col[ix] == best_value;
      const bool take = greater | (equal & (arg[ix] < best_row));  // | and &: no branches
      best = take ? ix : best;
      best_value = take ? col[ix] : best_value;
      best_row = take ? arg[ix] : best_row;
    }
    gx[best_row * width + best] += gy[ox];
  }
}

// Sum and avg backward of one output row: the adjoint of ForwardRow. avg's
// scaling is one explicit fused multiply-add per share, so that the
// kernel layer's PoolGradKernel (which a compiler may fuse) gives the same
// bits.
void SumBackwardRow(const Geometry& g, int64_t oy, const float* gy, float* col, float* gx) {
  std::fill(col, col + g.width, 0.0f);
  const int64_t sx = g.win.stride[1];
  const float* inv = g.type == PoolType::kAvg ? g.inv_divisor.data() + oy * g.out_w : nullptr;
  for (int64_t kx = 0; kx < g.win.kernel[1]; ++kx) {
    float* c = col + kx - g.win.pad[1];
    if (inv == nullptr) {
      for (int64_t ox = g.x_lo[kx]; ox < g.x_hi[kx]; ++ox) c[ox * sx] += gy[ox];
    } else {
      for (int64_t ox = g.x_lo[kx]; ox < g.x_hi[kx]; ++ox) {
        c[ox * sx] = std::fma(gy[ox], inv[ox], c[ox * sx]);
      }
    }
  }
  int64_t y0, y1;
  g.Rows(oy, &y0, &y1);
  for (int64_t iy = y0; iy < y1; ++iy) {
    float* r = gx + iy * g.width;
    for (int64_t ix = 0; ix < g.width; ++ix) r[ix] += col[ix];
  }
}

void Backward(const OpContext& ctx, const ParsedParams& p, const std::vector<TBlob>& out_grad,
              const std::vector<TBlob>& in, const std::vector<TBlob>& out,
              const std::vector<OpReq>& req, const std::vector<TBlob>& in_grad,
              const std::vector<TBlob>&) {
  if (req[0] == OpReq::kNull) return;
  if (ctx.ctx.is_gpu() && UsesCudnn(p)) {
    kernel::ThrowIfLaunchFailed(
        kernel::GpuPoolBackward(ctx.ctx.device_id, CudnnShape(p, in[0].shape, out[0].shape),
                                in[0].data, out[0].data, out_grad[0].data, in_grad[0].data,
                                Beta(req[0])),
        "Pooling", ctx.ctx);
    return;
  }
  if (ctx.ctx.is_gpu()) {
    kernel::Launch<kernel::PoolGradKernel>(
        "Pooling", ctx.ctx, in[0].shape.Size(),
        {in_grad[0].data, in[0].data, out_grad[0].data,
         KernelWindows(p, in[0].shape, out_grad[0].shape), req[0] == OpReq::kAdd});
    return;
  }
  const Geometry g = MakeGeometry(p, in[0].shape, out_grad[0].shape);
  // Blocked data is global avg or sum pooling's, or else 2x2 max's (Blocked).
  if (in[0].blocked && p.GetBool("global_pool")) {
    BlockedGlobalBackward(g, out_grad[0].data, req[0], in_grad[0].data);
    return;
  }
  if (IsMax2x2Stride2(g)) {
    const float *x = in[0].data, *gy = out_grad[0].data;
    in[0].blocked ? Max2x2Backward<kBlock>(g, x, gy, req[0], in_grad[0].data)
                  : Max2x2Backward<1>(g, x, gy, req[0], in_grad[0].data);
    return;
  }
  const int64_t in_plane = g.height * g.width, out_plane = g.out_h * g.out_w;
  ForEachPlaneRange(g, [&](int64_t begin, int64_t end) {
    std::vector<float> col(g.width);
    std::vector<int32_t> arg(g.width);  // rows: Infer keeps the height below 2^31
    for (int64_t pl = begin; pl < end; ++pl) {
      const float* x = in[0].data + pl * in_plane;
      float* gx = in_grad[0].data + pl * in_plane;
      const float* gy = out_grad[0].data + pl * out_plane;
      if (req[0] == OpReq::kWrite) std::fill(gx, gx + in_plane, 0.0f);
      for (int64_t oy = 0; oy < g.out_h; ++oy) {
        if (g.type == PoolType::kMax) {
          MaxBackwardRow(g, x, oy, gy + oy * g.out_w, col.data(), arg.data(), gx);
        } else {
          SumBackwardRow(g, oy, gy + oy * g.out_w, col.data(), gx);
        }
      }
    }
  });
}

OpDef Make() {
  OpDef op;
  op.name = "Pooling";
  op.params = {
      {"kernel", ParamSpec::Type::kShape, "()"},
      {"pool_type", ParamSpec::Type::kString, "max", false, {"max", "avg", "sum"}},
      {"global_pool", ParamSpec::Type::kBool, "False"},
      {"pooling_convention", ParamSpec::Type::kString, "valid", false, {"valid", "full"}},
      {"stride", ParamSpec::Type::kShape, "(1,1)"},
      {"pad", ParamSpec::Type::kShape, "(0,0)"},
      {"count_include_pad", ParamSpec::Type::kBool, "True"},
      // On GPUs, the kernel layer instead of cuDNN (as MXNet's).
      {"cudnn_off", ParamSpec::Type::kBool, "False"},
      // Accepted for MXNet compatibility.
      {"layout", ParamSpec::Type::kString, "None", false, {"None", "NCHW"}},
  };
  op.infer_shape = Infer;
  op.forward = Forward;
  op.backward = Backward;
  op.blocked = Blocked;
  // Backward finds the maxima again from the input on the CPU; cuDNN reads
  // the output too.
  op.backward_uses_outputs = OpDef::OutputUse::kAll;
  op.gpu = true;
  return op;
}

MX_REGISTER_OP(Make());

}  // namespace
}  // namespace mx::ops
