// Convolution (2-D, NCHW), as MXNet's: data (N, C, H, W), weight
// (num_filter, C / num_group, kh, kw), bias (num_filter,), output
// (N, num_filter, oh, ow) with oh = (H + 2 * pad - dilate * (kh - 1) - 1) /
// stride + 1.
//
// The kernels lower the convolution to matrix products (im2col + sgemm).
// Images are processed in chunks of B: the chunk is unfolded into a column
// matrix `col` of (C * kh * kw) rows and B * oh * ow columns, and one sgemm
// per group covers the whole chunk. B is the fewest images that give the
// products kMinColumns columns (LeNet's 5x5x50 layer has 8x8 outputs: one
// image alone would give 64), but at least one and within the `workspace`
// parameter (MB), as MXNet bounds it. With B > 1 the product lands in
// `tmp`, laid out (num_filter, B, oh * ow), and is scattered to NCHW; with
// B = 1 it is written in place, onto the bias. Backward gathers the output
// gradient the same way, takes the weight gradient from tmp * col^T (col
// recomputed from the data), the data gradient from col2im(weight^T * tmp)
// and the bias gradient from the sums of tmp's rows.
//
// Layers of one group with kDnnlMinChannels input channels or more, or
// with filters in multiples of 16, run through oneDNN instead
// (graph/ops/dnnl_conv.h): the batch is cut into
// kDnnlChunksPerThread chunks of images per pool thread, each chunk one
// oneDNN call on the thread that claims it, and the weight and bias
// gradients of the chunks are added in chunk order. On GPUs the operator
// calls cuDNN (ndarray/dnn.h).
//
// Chunks run in parallel on the CPU pool (ndarray/parallel.h), each thread
// with its own col and tmp in the operator workspace. The weight and bias
// gradients are summed per task (a fixed range of chunks) into the task's
// own partials, and the partials are added in task order, so results do
// not depend on which thread ran what.
#include <algorithm>
#include <cstring>
#include <optional>

#include "graph/ops/dnnl_conv.h"
#include "graph/ops/op_util.h"
#include "graph/ops/window2d.h"
#include "ndarray/dnn.h"
#include "ndarray/launch.h"
#include "ndarray/nn_kernels.h"
#include "ndarray/parallel.h"

namespace mx::ops {
namespace {

// Input channels from which oneDNN runs a layer (one group). Below, on
// one input channel (the ResNet's stem, LeNet's first layer), im2col was
// as fast or faster: 1.2-1.6 ms for forward plus backward through oneDNN
// against 0.9 and 1.5 ms. Above, oneDNN's direct convolution ran the zoo
// ResNet's 3x3x16 layers 3x faster (graph/ops/dnnl_conv.h), and its
// products in plain layouts LeNet's 20-channel layer faster too
// (graph_bench lenet, mx only, 8 rounds in turns: faster in all 8, by 3-8%).
// Layers with filters in multiples of 16 run through oneDNN below it too:
// their blocked output saves the next layers' conversions (the executor's
// blocked layouts), and the ResNet's stem took 416 us (forward plus
// backward) against im2col's 641.
constexpr int64_t kDnnlMinChannels = 16;

// Columns of the matrix products per chunk: sgemm runs far below its peak
// on thinner matrices, and wider ones only add cache misses.
constexpr int64_t kMinColumns = 256;

absl::StatusOr<Window2D> ParseWindow(const ParsedParams& p) {
  Window2D w;
  const Shape kernel = p.GetShape("kernel");
  if (kernel.ndim() != 2) {
    return absl::UnimplementedError(absl::StrCat(
        "parameter kernel=", kernel.ToString(), " has ", kernel.ndim(),
        " dimensions; only 2-D convolution (kernel=(kh, kw)) is supported"));
  }
  MX_RETURN_IF_ERROR(Get2D(p, "kernel", 1, w.kernel));
  MX_RETURN_IF_ERROR(Get2D(p, "stride", 1, w.stride));
  MX_RETURN_IF_ERROR(Get2D(p, "dilate", 1, w.dilate));
  MX_RETURN_IF_ERROR(Get2D(p, "pad", 0, w.pad));
  const int64_t filters = p.GetInt("num_filter");
  const int64_t groups = p.GetInt("num_group");
  if (filters < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("parameter num_filter=", filters, " must be positive"));
  }
  if (groups < 1 || filters % groups != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "parameter num_group=", groups, " must be positive and divide num_filter=",
        filters));
  }
  return w;
}

// Everything the kernels need to know about one convolution.
struct Geometry {
  Window2D win;
  int64_t batch, channels, height, width;
  int64_t filters, groups, out_h, out_w;
  int64_t chunk;  // images per im2col chunk

  int64_t OutPlane() const { return out_h * out_w; }
  // "Same" convolutions with stride 1 (ResNet's 3x3, pad 1): input and
  // output rows are equally long, so a kernel offset's rows lie end to end
  // in both and move as one block (CopyBlock, AddBlock).
  bool RowsContiguous() const { return win.stride[0] == 1 && win.stride[1] == 1 && width == out_w; }
  int64_t ColRows() const { return channels * win.kernel[0] * win.kernel[1]; }
  // Rows of one group's part of col, and its filters.
  int64_t GroupRows() const { return ColRows() / groups; }
  int64_t GroupFilters() const { return filters / groups; }
  // Floats of col and of tmp for `images` images.
  int64_t ColFloats(int64_t images) const { return ColRows() * images * OutPlane(); }
  int64_t TmpFloats(int64_t images) const { return filters * images * OutPlane(); }
  int64_t Chunks() const { return (batch + chunk - 1) / chunk; }

  // The workspace: one col + tmp per thread, then the weight-gradient
  // partials of backward's tasks.
  int64_t SlotFloats() const { return ColFloats(chunk) + TmpFloats(chunk); }
  int64_t WeightFloats() const { return filters * GroupRows(); }
  // Backward's tasks: up to eight per thread, so that a late or preempted
  // helper leaves the others at most one short task to wait for (with two
  // per thread, the callers of ResNet's 3x3 layers spent 6% of the step's
  // CPU waiting at the end). Each task has a weight partial of its own, and
  // the partials take no more than the threads' slots (at least two tasks
  // per thread): large weights (LeNet's 5x5x20x50) get fewer tasks.
  int64_t Tasks() const {
    const int64_t threads = CpuThreads();
    const int64_t by_memory = threads * SlotFloats() / std::max<int64_t>(WeightFloats(), 1);
    return std::min(Chunks(), std::clamp<int64_t>(by_memory, 2 * threads, 8 * threads));
  }
  int64_t WorkspaceFloats() const {
    return CpuThreads() * SlotFloats() + Tasks() * WeightFloats();
  }
  float* Slot(float* workspace, int slot) const { return workspace + slot * SlotFloats(); }
  float* Partial(float* workspace, int64_t task) const {
    return workspace + CpuThreads() * SlotFloats() + task * WeightFloats();
  }
};

// Images per chunk: enough for the products to have kMinColumns columns,
// within the workspace parameter (MB), at least one.
int64_t ChunkImages(const ParsedParams& p, const Geometry& g) {
  const int64_t plane = std::max<int64_t>(g.OutPlane(), 1);
  int64_t images = std::clamp<int64_t>((kMinColumns + plane - 1) / plane, 1,
                                       std::max<int64_t>(g.batch, 1));
  const int64_t per_image = (g.ColFloats(1) + g.TmpFloats(1)) * sizeof(float);
  const int64_t limit = p.GetInt("workspace") * (int64_t{1} << 20);
  return std::max<int64_t>(1, std::min(images, limit / std::max<int64_t>(per_image, 1)));
}

// Geometry of a bound convolution; the shapes were checked by Infer.
Geometry MakeGeometry(const ParsedParams& p, const Shape& data,
                      const Shape& out) {
  Geometry g;
  g.win = *ParseWindow(p);
  g.batch = data[0];
  g.channels = data[1];
  g.height = data[2];
  g.width = data[3];
  g.filters = p.GetInt("num_filter");
  g.groups = p.GetInt("num_group");
  g.out_h = out[2];
  g.out_w = out[3];
  g.chunk = ChunkImages(p, g);
  return g;
}

// The convolution of `images` images of g's (as cuDNN and oneDNN take it).
kernel::ConvShape ShapeOf(const Geometry& g, int64_t images) {
  return {images, g.channels, g.height, g.width, g.filters, g.win.kernel[0], g.win.kernel[1],
          {g.win.pad[0], g.win.pad[1]}, {g.win.stride[0], g.win.stride[1]},
          {g.win.dilate[0], g.win.dilate[1]}, g.groups, g.out_h, g.out_w};
}

// ---- The oneDNN path's division of the batch and its workspace.

// Chunks of the batch per pool thread on the oneDNN path: with one per
// thread, a helper that started late or was preempted left the others
// waiting. The zoo ResNet's forward plus backward (batch 100, 2 threads),
// 9 rounds in turns: 4 per thread ran faster than 1 in 8 of 9 pairs
// (medians 3,748 and 3,554 samples/s), 2 per thread in between.
constexpr int64_t kDnnlChunksPerThread = 4;

// The oneDNN path of one call: the primitives of a chunk of `images`
// images and of the last chunk (which may have fewer), and the workspace:
// each thread's scratch, then each chunk's weight gradient followed by its
// bias gradient.
struct DnnlPlan {
  const dnnl_conv::Primitives* full;
  const dnnl_conv::Primitives* last;
  int64_t images, chunks, slot, partial;

  const dnnl_conv::Primitives& Of(int64_t chunk) const {
    return chunk + 1 == chunks ? *last : *full;
  }
  int64_t Floats() const { return CpuThreads() * slot + chunks * partial; }
  float* Slot(float* workspace, int s) const { return workspace + s * slot; }
  float* Partial(float* workspace, int64_t chunk) const {
    return workspace + CpuThreads() * slot + chunk * partial;
  }
};

// The plan of this layer when oneDNN runs it (see kDnnlMinChannels), with
// x (dx) and y (dy) in the given layouts.
std::optional<DnnlPlan> PlanDnnl(const ParsedParams& p, const Geometry& g,
                                 dnnl_conv::Layouts layouts = {}) {
  const bool blocked_output = g.filters % kernel::kChannelBlock == 0;
  if (g.groups != 1 || (g.channels < kDnnlMinChannels && !blocked_output) || g.batch < 1) {
    return std::nullopt;
  }
  const int64_t wanted = std::min<int64_t>(kDnnlChunksPerThread * CpuThreads(), g.batch);
  DnnlPlan plan;
  plan.images = (g.batch + wanted - 1) / wanted;
  plan.chunks = (g.batch + plan.images - 1) / plan.images;
  const bool bias = !p.GetBool("no_bias");
  plan.full = dnnl_conv::Find(ShapeOf(g, plan.images), bias, layouts);
  plan.last = dnnl_conv::Find(ShapeOf(g, g.batch - (plan.chunks - 1) * plan.images), bias, layouts);
  if (plan.full == nullptr || plan.last == nullptr) return std::nullopt;
  plan.slot = std::max(dnnl_conv::ScratchFloats(*plan.full), dnnl_conv::ScratchFloats(*plan.last));
  plan.partial = g.WeightFloats() + g.filters;
  return plan;
}

absl::Status Infer(const ParsedParams& p, ShapeList* in, ShapeList* out,
                   ShapeList*) {
  MX_ASSIGN_OR_RETURN(Window2D w, ParseWindow(p));
  const int64_t filters = p.GetInt("num_filter");
  const int64_t groups = p.GetInt("num_group");
  if ((*in)[0].ndim() != 0 && (*in)[0].ndim() != 4) {
    return absl::InvalidArgumentError(absl::StrCat(
        "input data must be 4-D (batch, channel, height, width), but has shape ",
        (*in)[0].ToString()));
  }
  // The weight knows the channels when the data does not.
  const Shape& weight = (*in)[1];
  const bool data_has_channels = (*in)[0].ndim() == 4 && (*in)[0][1] != 0;
  if (!data_has_channels && weight.ndim() == 4 && weight[1] != 0) {
    MX_RETURN_IF_ERROR(MergeShape(in, 0, Shape{0, weight[1] * groups, 0, 0}, "input data"));
  }
  if (!p.GetBool("no_bias")) {
    MX_RETURN_IF_ERROR(MergeShape(in, 2, Shape{filters}, "input bias"));
  }
  const Shape& data = (*in)[0];
  const int64_t channels = data.ndim() == 4 ? data[1] : 0;
  if (channels % groups != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "input data has shape ", data.ToString(), ": its ", channels,
        " channels do not divide into num_group=", groups, " groups"));
  }
  MX_RETURN_IF_ERROR(MergeShape(
      in, 1, Shape{filters, channels / groups, w.kernel[0], w.kernel[1]}, "input weight"));
  if (data.ndim() == 0) return absl::OkStatus();
  Shape o{data[0], filters, 0, 0};
  for (int d = 0; d < 2; ++d) {
    const int64_t size = data[2 + d];
    if (size == 0) continue;
    if (size + 2 * w.pad[d] < w.Extent(d)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "kernel ", p.GetShape("kernel").ToString(), " with dilate (", w.dilate[0], ",",
          w.dilate[1], ") spans ", w.Extent(0), "x", w.Extent(1),
          " and does not fit in input data of shape ", data.ToString(),
          " padded by (", w.pad[0], ",", w.pad[1], ")"));
    }
    o[2 + d] = WindowOutput(w, d, size, false);
  }
  return MergeShape(out, 0, o, "output");
}

// Data and output blocked where oneDNN's primitives for the layer work in
// that layout (dnnl_conv.h).
BlockedIo Blocked(const ParsedParams& p, const ShapeList& in, const ShapeList& out) {
  const std::optional<DnnlPlan> plan = PlanDnnl(p, MakeGeometry(p, in[0], out[0]));
  BlockedIo io;
  if (!plan) return io;
  const dnnl_conv::Layouts full = dnnl_conv::WorksBlocked(*plan->full),
                           last = dnnl_conv::WorksBlocked(*plan->last);
  if (full.x && last.x) io.inputs = {0};
  if (full.y && last.y) io.outputs = {0};
  return io;
}

// The oneDNN plan for blobs x and y, which must exist when either is
// blocked (the executor asked Blocked first).
std::optional<DnnlPlan> PlanDnnlFor(const ParsedParams& p, const Geometry& g, const TBlob& x,
                                    const TBlob& y) {
  std::optional<DnnlPlan> plan = PlanDnnl(p, g, {x.blocked, y.blocked});
  MX_THROW_IF_NOT(plan.has_value() || (!x.blocked && !y.blocked),
                  "Convolution: blocked data without oneDNN primitives that take it");
  return plan;
}

// Room for either CPU path: a forward that adds to its output runs im2col.
// Plain layouts need the most (their conversions to oneDNN's). None on a
// GPU: cuDNN takes its scratch memory from the stream (ndarray/cuda/dnn.cc).
size_t Workspace(const ParsedParams& p, const ShapeList& in, const ShapeList& out, Context ctx) {
  if (ctx.is_gpu()) return 0;
  const Geometry g = MakeGeometry(p, in[0], out[0]);
  const std::optional<DnnlPlan> plan = PlanDnnl(p, g);
  const int64_t dnnl = plan ? plan->Floats() : 0;
  return std::max(g.WorkspaceFloats(), dnnl) * sizeof(float);
}

// Sets the columns outside [lo, hi) of rows [0, rows) of n floats to 0.
inline void ClearOutside(float* d, int64_t rows, int64_t lo, int64_t hi, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = d + r * n;
    for (int64_t ox = 0; ox < lo; ++ox) row[ox] = 0.0f;
    for (int64_t ox = hi; ox < n; ++ox) row[ox] = 0.0f;
  }
}

// Copies n floats (n >= 8) in 8-float pieces, one vector move each; the
// last piece overlaps the one before it when n is not a multiple of 8.
// Rows of col are short (LeNet's second layer: 8 floats), and a loop the
// compiler turns into a memcpy call per row costs as much as the copy.
inline void CopyShort(const float* __restrict s, int64_t n, float* __restrict d) {
  const int64_t last = n - 8;
  for (int64_t i = 0; i < last; i += 8) std::memcpy(d + i, s + i, 8 * sizeof(float));
  std::memcpy(d + last, s + last, 8 * sizeof(float));
}

// Rows of col from input rows with horizontal stride 1: for r in
// [0, rows), d[r * n + ox] = s[r * pitch + ox] for ox in [lo, hi) and 0
// elsewhere in [0, n). The per-row work is one copy (CopyShort); the
// zeros are written only where padding puts them.
inline void CopyRows(const float* __restrict s, int64_t pitch, int64_t rows, int64_t lo,
                     int64_t hi, int64_t n, float* __restrict d) {
  const int64_t len = hi - lo;
  if (len >= 8) {
    for (int64_t r = 0; r < rows; ++r) CopyShort(s + r * pitch + lo, len, d + r * n + lo);
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t ox = lo; ox < hi; ++ox) d[r * n + ox] = s[r * pitch + ox];
    }
  }
  if (lo > 0 || hi < n) ClearOutside(d, rows, lo, hi, n);
}

// One row of col with horizontal stride > 1: d[ox] = s[ox * stride] for
// ox in [lo, hi), 0 elsewhere in [0, n).
inline void CopyStridedRow(const float* __restrict s, int64_t stride, int64_t lo, int64_t hi,
                           int64_t n, float* __restrict d) {
  for (int64_t ox = 0; ox < lo; ++ox) d[ox] = 0.0f;
  for (int64_t ox = lo; ox < hi; ++ox) d[ox] = s[ox * stride];
  for (int64_t ox = hi; ox < n; ++ox) d[ox] = 0.0f;
}

// Rows [0, rows) of n floats: d[r * n + ox] = s[r * n + ox] for ox in
// [lo, hi), 0 elsewhere, where source rows are n floats apart too. One copy
// from the first valid element to the last, then the columns outside
// [lo, hi) of every row are cleared (the copy put neighbouring rows' values
// there); every address read lies between two valid ones.
inline void CopyBlock(const float* s, int64_t rows, int64_t lo, int64_t hi, int64_t n,
                      float* d) {
  if (rows <= 0 || lo >= hi) {
    std::fill(d, d + rows * n, 0.0f);
    return;
  }
  const int64_t first = lo, last = (rows - 1) * n + hi;  // [first, last) is copied
  std::memcpy(d + first, s + first, (last - first) * sizeof(float));
  ClearOutside(d, rows, lo, hi, n);
}

// Unfolds `images` images starting at `data` into col (ColRows() x
// images * OutPlane()).
void Im2Col(const Geometry& g, const float* data, int64_t images, float* col) {
  const Window2D& w = g.win;
  const int64_t out_w = g.out_w;
  const bool rows_contiguous = g.RowsContiguous();
  const int64_t plane = g.height * g.width;
  const int64_t out_plane = g.OutPlane();
  const int64_t row_len = images * out_plane;
  float* row = col;
  for (int64_t c = 0; c < g.channels; ++c) {
    for (int64_t ky = 0; ky < w.kernel[0]; ++ky) {
      const int64_t y_off = ky * w.dilate[0] - w.pad[0];
      int64_t y_lo, y_hi;
      ValidRange(y_off, w.stride[0], g.height, g.out_h, &y_lo, &y_hi);
      for (int64_t kx = 0; kx < w.kernel[1]; ++kx, row += row_len) {
        const int64_t x_off = kx * w.dilate[1] - w.pad[1];
        int64_t x_lo, x_hi;
        ValidRange(x_off, w.stride[1], g.width, g.out_w, &x_lo, &x_hi);
        for (int64_t b = 0; b < images; ++b) {
          const float* src = data + (b * g.channels + c) * plane;
          float* dst = row + b * out_plane;
          std::fill(dst, dst + y_lo * out_w, 0.0f);
          if (rows_contiguous) {
            CopyBlock(src + (y_lo + y_off) * g.width + x_off, y_hi - y_lo, x_lo, x_hi, out_w,
                      dst + y_lo * out_w);
          } else if (w.stride[1] == 1) {
            CopyRows(src + (y_lo * w.stride[0] + y_off) * g.width + x_off, w.stride[0] * g.width,
                     y_hi - y_lo, x_lo, x_hi, out_w, dst + y_lo * out_w);
          } else {
            for (int64_t oy = y_lo; oy < y_hi; ++oy) {
              CopyStridedRow(src + (oy * w.stride[0] + y_off) * g.width + x_off, w.stride[1],
                             x_lo, x_hi, out_w, dst + oy * out_w);
            }
          }
          std::fill(dst + y_hi * out_w, dst + out_plane, 0.0f);
        }
      }
    }
  }
}

// The adjoint of CopyBlock: d[r * n + ox] += s[r * n + ox] for ox in
// [lo, hi). s's entries outside [lo, hi) are set to 0 first (s is scratch),
// so that one add loop covers the block from the first valid element to
// the last: the entries between rows then add 0.
inline void AddBlock(float* s, int64_t rows, int64_t lo, int64_t hi, int64_t n,
                     float* __restrict d) {
  if (rows <= 0 || lo >= hi) return;
  ClearOutside(s, rows, lo, hi, n);
  const float* __restrict from = s;
  for (int64_t k = lo, last = (rows - 1) * n + hi; k < last; ++k) d[k] += from[k];
}

// The adjoint of CopyRows: d[r * pitch + ox] += s[r * n + ox] for r in
// [0, rows), ox in [lo, hi). Whole 8-float pieces first (one vector add
// each: rows are short, see CopyShort), then the rest one by one.
inline void AddRows(const float* __restrict s, int64_t rows, int64_t lo, int64_t hi, int64_t n,
                    int64_t pitch, float* __restrict d) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* from = s + r * n;
    float* to = d + r * pitch;
    int64_t ox = lo;
    for (; ox + 8 <= hi; ox += 8) {
      for (int k = 0; k < 8; ++k) to[ox + k] += from[ox + k];
    }
    for (; ox < hi; ++ox) to[ox] += from[ox];
  }
}

// The adjoint of Im2Col: adds every entry of col to the input element it
// was read from. Overwrites col's entries that no input element has.
void Col2ImAdd(const Geometry& g, float* col, int64_t images, float* data) {
  const Window2D& w = g.win;
  const bool rows_contiguous = g.RowsContiguous();
  const int64_t plane = g.height * g.width;
  const int64_t out_plane = g.OutPlane();
  const int64_t row_len = images * out_plane;
  float* row = col;
  for (int64_t c = 0; c < g.channels; ++c) {
    for (int64_t ky = 0; ky < w.kernel[0]; ++ky) {
      const int64_t y_off = ky * w.dilate[0] - w.pad[0];
      int64_t y_lo, y_hi;
      ValidRange(y_off, w.stride[0], g.height, g.out_h, &y_lo, &y_hi);
      for (int64_t kx = 0; kx < w.kernel[1]; ++kx, row += row_len) {
        const int64_t x_off = kx * w.dilate[1] - w.pad[1];
        int64_t x_lo, x_hi;
        ValidRange(x_off, w.stride[1], g.width, g.out_w, &x_lo, &x_hi);
        for (int64_t b = 0; b < images; ++b) {
          float* dst = data + (b * g.channels + c) * plane;
          float* src = row + b * out_plane;
          if (rows_contiguous) {
            AddBlock(src + y_lo * g.out_w, y_hi - y_lo, x_lo, x_hi, g.out_w,
                     dst + (y_lo + y_off) * g.width + x_off);
            continue;
          }
          if (w.stride[1] == 1) {
            AddRows(src + y_lo * g.out_w, y_hi - y_lo, x_lo, x_hi, g.out_w,
                    w.stride[0] * g.width, dst + (y_lo * w.stride[0] + y_off) * g.width + x_off);
            continue;
          }
          for (int64_t oy = y_lo; oy < y_hi; ++oy) {
            float* d = dst + (oy * w.stride[0] + y_off) * g.width + x_off;
            const float* s = src + oy * g.out_w;
            for (int64_t ox = x_lo; ox < x_hi; ++ox) d[ox * w.stride[1]] += s[ox];
          }
        }
      }
    }
  }
}

// The sum of n floats: eight running sums (one vector register), added
// in double at the end.
inline double SumRow(const float* x, int64_t n) {
  float lanes[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) lanes[k] += x[i + k];
  }
  double sum = 0;
  for (float v : lanes) sum += v;
  for (; i < n; ++i) sum += x[i];
  return sum;
}

// Forward of images [n0, n0 + images) with col and tmp at col.
void ForwardChunk(const Geometry& g, const ParsedParams& p, const std::vector<TBlob>& in,
                  OpReq req, const TBlob& out, int64_t n0, int64_t images, float* col) {
  const bool bias = !p.GetBool("no_bias");
  const int64_t plane = g.OutPlane();
  const int64_t image_in = g.channels * g.height * g.width;
  const int64_t image_out = g.filters * plane;
  const int64_t cols = images * plane;
  Im2Col(g, in[0].data + n0 * image_in, images, col);
  // One image in write mode: tmp is the output itself. With a bias, the
  // output starts as the bias and the products add to it: one pass over the
  // output fewer than adding the bias afterwards.
  const bool direct = images == 1 && req == OpReq::kWrite;
  float* tmp = direct ? out.data + n0 * image_out : col + g.ColFloats(images);
  if (direct && bias) {
    for (int64_t f = 0; f < g.filters; ++f) std::fill_n(tmp + f * plane, plane, in[2].data[f]);
  }
  const OpReq product = direct && bias ? OpReq::kAdd : OpReq::kWrite;
  for (int64_t gr = 0; gr < g.groups; ++gr) {
    Gemm(cpu(), product, false, false, g.GroupFilters(), cols, g.GroupRows(), 1.0f,
         in[1].data + gr * g.GroupFilters() * g.GroupRows(),
         col + gr * g.GroupRows() * cols, tmp + gr * g.GroupFilters() * cols);
  }
  if (direct) return;
  for (int64_t b = 0; b < images; ++b) {
    for (int64_t f = 0; f < g.filters; ++f) {
      const float* src = tmp + f * cols + b * plane;
      float* dst = out.data + (n0 + b) * image_out + f * plane;
      const float add = bias ? in[2].data[f] : 0.0f;
      if (req == OpReq::kAdd) {
        for (int64_t i = 0; i < plane; ++i) dst[i] += src[i] + add;
      } else {
        for (int64_t i = 0; i < plane; ++i) dst[i] = src[i] + add;
      }
    }
  }
}

// dst = (dst +) the sum of `count` partials of n floats, `stride` floats
// apart from first, added in order (so the result does not depend on
// which thread computed which partial).
void AddPartials(const float* first, int64_t stride, int64_t count, int64_t n, OpReq req,
                 float* dst) {
  if (req == OpReq::kWrite) {
    std::copy(first, first + n, dst);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] += first[i];
  }
  for (int64_t c = 1; c < count; ++c) {
    const float* pc = first + c * stride;
    for (int64_t i = 0; i < n; ++i) dst[i] += pc[i];
  }
}

// ---- On the CPU through oneDNN (forward: when its request is a write).

void DnnlForward(const OpContext& ctx, const ParsedParams& p, const Geometry& g,
                 const DnnlPlan& plan, const std::vector<TBlob>& in, const TBlob& out) {
  const int64_t image_in = g.channels * g.height * g.width, image_out = g.filters * g.OutPlane();
  const float* bias = p.GetBool("no_bias") ? nullptr : in[2].data;
  ParallelFor(plan.chunks, [&](int64_t chunk, int slot) {
    const int64_t n0 = chunk * plan.images;
    dnnl_conv::Forward(plan.Of(chunk), in[0].data + n0 * image_in, in[1].data, bias,
                       out.data + n0 * image_out, plan.Slot(ctx.workspace, slot));
  });
}

void DnnlBackward(const OpContext& ctx, const ParsedParams& p, const Geometry& g,
                  const DnnlPlan& plan, const float* dy, const std::vector<TBlob>& in,
                  const std::vector<OpReq>& req, const std::vector<TBlob>& in_grad) {
  const int64_t image_in = g.channels * g.height * g.width, image_out = g.filters * g.OutPlane();
  const bool want_dx = req[0] != OpReq::kNull, want_dw = req[1] != OpReq::kNull;
  const bool want_db = !p.GetBool("no_bias") && req[2] != OpReq::kNull;
  ParallelFor(plan.chunks, [&](int64_t chunk, int slot) {
    const int64_t n0 = chunk * plan.images;
    float* partial = plan.Partial(ctx.workspace, chunk);
    dnnl_conv::Backward(plan.Of(chunk), in[0].data + n0 * image_in, in[1].data, dy + n0 * image_out,
                        want_dx ? in_grad[0].data + n0 * image_in : nullptr, req[0] == OpReq::kAdd,
                        want_dw ? partial : nullptr, want_db ? partial + g.WeightFloats() : nullptr,
                        plan.Slot(ctx.workspace, slot));
  });
  const float* first = plan.Partial(ctx.workspace, 0);
  if (want_dw) {
    AddPartials(first, plan.partial, plan.chunks, g.WeightFloats(), req[1], in_grad[1].data);
  }
  if (want_db) {
    AddPartials(first + g.WeightFloats(), plan.partial, plan.chunks, g.filters, req[2],
                in_grad[2].data);
  }
}

// ---- On GPUs: cuDNN (ndarray/dnn.h).

float Beta(OpReq req) { return req == OpReq::kAdd ? 1.0f : 0.0f; }

void GpuForward(const OpContext& ctx, const ParsedParams& p, const Geometry& g,
                const std::vector<TBlob>& in, OpReq req, const TBlob& out) {
  const kernel::ConvShape s = ShapeOf(g, g.batch);
  const int dev = ctx.ctx.device_id;
  kernel::ThrowIfLaunchFailed(
      kernel::GpuConvForward(dev, s, in[0].data, in[1].data, out.data, Beta(req)),
      "Convolution", ctx.ctx);
  if (!p.GetBool("no_bias")) {
    kernel::ThrowIfLaunchFailed(kernel::GpuConvAddBias(dev, s, in[2].data, out.data),
                                "Convolution", ctx.ctx);
  }
}

void GpuBackward(const OpContext& ctx, const ParsedParams& p, const Geometry& g,
                 const float* dy, const std::vector<TBlob>& in,
                 const std::vector<OpReq>& req, const std::vector<TBlob>& in_grad) {
  const kernel::ConvShape s = ShapeOf(g, g.batch);
  const int dev = ctx.ctx.device_id;
  if (req[0] != OpReq::kNull) {
    kernel::ThrowIfLaunchFailed(
        kernel::GpuConvBackwardData(dev, s, in[1].data, dy, in_grad[0].data, Beta(req[0])),
        "Convolution", ctx.ctx);
  }
  if (req[1] != OpReq::kNull) {
    kernel::ThrowIfLaunchFailed(
        kernel::GpuConvBackwardFilter(dev, s, in[0].data, dy, in_grad[1].data, Beta(req[1])),
        "Convolution", ctx.ctx);
  }
  if (!p.GetBool("no_bias") && req[2] != OpReq::kNull) {
    kernel::ThrowIfLaunchFailed(
        kernel::GpuConvBackwardBias(dev, s, dy, in_grad[2].data, Beta(req[2])), "Convolution",
        ctx.ctx);
  }
}

void Forward(const OpContext& ctx, const ParsedParams& p,
             const std::vector<TBlob>& in, const std::vector<OpReq>& req,
             const std::vector<TBlob>& out, const std::vector<TBlob>&) {
  if (req[0] == OpReq::kNull) return;
  const Geometry g = MakeGeometry(p, in[0].shape, out[0].shape);
  if (ctx.ctx.is_gpu()) {
    GpuForward(ctx, p, g, in, req[0], out[0]);
    return;
  }
  MX_THROW_IF_NOT(req[0] == OpReq::kWrite || (!in[0].blocked && !out[0].blocked),
                  "Convolution: a blocked forward adds to its output");
  if (req[0] == OpReq::kWrite) {
    if (const std::optional<DnnlPlan> plan = PlanDnnlFor(p, g, in[0], out[0])) {
      DnnlForward(ctx, p, g, *plan, in, out[0]);
      return;
    }
  }
  ParallelFor(g.Chunks(), [&](int64_t chunk, int slot) {
    const int64_t n0 = chunk * g.chunk;
    ForwardChunk(g, p, in, req[0], out[0], n0, std::min(g.chunk, g.batch - n0),
                 g.Slot(ctx.workspace, slot));
  });
}

void Backward(const OpContext& ctx, const ParsedParams& p,
              const std::vector<TBlob>& out_grad, const std::vector<TBlob>& in,
              const std::vector<TBlob>&, const std::vector<OpReq>& req,
              const std::vector<TBlob>& in_grad, const std::vector<TBlob>&) {
  const Geometry g = MakeGeometry(p, in[0].shape, out_grad[0].shape);
  if (ctx.ctx.is_gpu()) {
    GpuBackward(ctx, p, g, out_grad[0].data, in, req, in_grad);
    return;
  }
  const bool bias = !p.GetBool("no_bias") && req[2] != OpReq::kNull;
  if (req[0] == OpReq::kNull && req[1] == OpReq::kNull && !bias) return;
  if (const std::optional<DnnlPlan> plan = PlanDnnlFor(p, g, in[0], out_grad[0])) {
    DnnlBackward(ctx, p, g, *plan, out_grad[0].data, in, req, in_grad);
    return;
  }
  const int64_t plane = g.OutPlane();
  const int64_t image_in = g.channels * g.height * g.width;
  const int64_t image_out = g.filters * plane;
  const float* dout = out_grad[0].data;
  // Every task gets at least one chunk (so every partial is written).
  const int64_t per_task = (g.Chunks() + g.Tasks() - 1) / g.Tasks();
  const int64_t tasks = (g.Chunks() + per_task - 1) / per_task;
  // The bias gradient's partial sums, one row of filters per task.
  std::vector<double> bias_partials(bias ? tasks * g.filters : 0, 0.0);
  ParallelFor(tasks, [&](int64_t task, int slot) {
    float* col = g.Slot(ctx.workspace, slot);
    float* partial = g.Partial(ctx.workspace, task);
    const int64_t first = task * per_task * g.chunk;
    const int64_t last = std::min(g.batch, (task + 1) * per_task * g.chunk);
    for (int64_t n0 = first; n0 < last; n0 += g.chunk) {
      const int64_t images = std::min(g.chunk, g.batch - n0);
      const int64_t cols = images * plane;
      // tmp: the chunk's output gradient as (filters, images * plane).
      const float* tmp = dout + n0 * image_out;
      if (images > 1) {
        float* gathered = col + g.ColFloats(images);
        for (int64_t b = 0; b < images; ++b) {
          for (int64_t f = 0; f < g.filters; ++f) {
            std::memcpy(gathered + f * cols + b * plane,
                        dout + (n0 + b) * image_out + f * plane, plane * sizeof(float));
          }
        }
        tmp = gathered;
      }
      if (bias) {
        // While the chunk's gradient is in cache, and in parallel: as a
        // serial pass of its own before the loop, LeNet's first layer's
        // backward took 1.10-1.15 ms, now 0.80-0.85 ms.
        double* sums = bias_partials.data() + task * g.filters;
        for (int64_t f = 0; f < g.filters; ++f) sums[f] += SumRow(tmp + f * cols, cols);
      }
      if (req[1] != OpReq::kNull) {
        Im2Col(g, in[0].data + n0 * image_in, images, col);
        const OpReq wreq = n0 == first ? OpReq::kWrite : OpReq::kAdd;
        for (int64_t gr = 0; gr < g.groups; ++gr) {
          Gemm(cpu(), wreq, false, true, g.GroupFilters(), g.GroupRows(), cols, 1.0f,
               tmp + gr * g.GroupFilters() * cols, col + gr * g.GroupRows() * cols,
               partial + gr * g.GroupFilters() * g.GroupRows());
        }
      }
      if (req[0] != OpReq::kNull) {
        float* dx = in_grad[0].data + n0 * image_in;
        if (req[0] == OpReq::kWrite) std::fill(dx, dx + images * image_in, 0.0f);
        for (int64_t gr = 0; gr < g.groups; ++gr) {
          Gemm(cpu(), OpReq::kWrite, true, false, g.GroupRows(), cols, g.GroupFilters(), 1.0f,
               in[1].data + gr * g.GroupFilters() * g.GroupRows(),
               tmp + gr * g.GroupFilters() * cols, col + gr * g.GroupRows() * cols);
        }
        Col2ImAdd(g, col, images, dx);
      }
    }
  });
  if (bias) {
    // The partials in task order, so the sum does not depend on timing.
    for (int64_t f = 0; f < g.filters; ++f) {
      double sum = 0;
      for (int64_t t = 0; t < tasks; ++t) sum += bias_partials[t * g.filters + f];
      Store(req[2], in_grad[2].data + f, static_cast<float>(sum));
    }
  }
  if (req[1] == OpReq::kNull) return;
  AddPartials(g.Partial(ctx.workspace, 0), g.WeightFloats(), tasks, g.WeightFloats(), req[1],
              in_grad[1].data);
}

OpDef Make() {
  OpDef op;
  op.name = "Convolution";
  op.params = {
      {"kernel", ParamSpec::Type::kShape, "", true},
      {"num_filter", ParamSpec::Type::kInt, "", true},
      {"stride", ParamSpec::Type::kShape, "(1,1)"},
      {"dilate", ParamSpec::Type::kShape, "(1,1)"},
      {"pad", ParamSpec::Type::kShape, "(0,0)"},
      {"num_group", ParamSpec::Type::kInt, "1"},
      {"workspace", ParamSpec::Type::kInt, "1024"},
      {"no_bias", ParamSpec::Type::kBool, "False"},
      // Accepted for MXNet compatibility; the CPU kernels have one algorithm.
      {"cudnn_tune", ParamSpec::Type::kString, "None", false,
       {"None", "off", "limited_workspace", "fastest"}},
      {"cudnn_off", ParamSpec::Type::kBool, "False"},
      {"layout", ParamSpec::Type::kString, "None", false, {"None", "NCHW"}},
  };
  op.arguments = [](const ParsedParams& p) {
    return p.GetBool("no_bias") ? std::vector<std::string>{"data", "weight"}
                                : std::vector<std::string>{"data", "weight", "bias"};
  };
  op.infer_shape = Infer;
  op.forward = Forward;
  op.backward = Backward;
  op.workspace = Workspace;
  op.blocked = Blocked;
  op.backward_uses_outputs = OpDef::OutputUse::kNone;
  op.uses_all_cores = true;  // matrix products, oneDNN chunks
  op.gpu = true;             // cuDNN
  return op;
}

MX_REGISTER_OP(Make());

}  // namespace
}  // namespace mx::ops
