// Kernels of the neural-network operators (graph/ops), written once for the
// CPU and the GPU like those of ndarray/kernel.h. `add` selects the
// operators' kAdd request (accumulate into the output) over kWrite.
// This header includes no CUDA or abseil header.
#ifndef MX_NDARRAY_NN_KERNELS_H_
#define MX_NDARRAY_NN_KERNELS_H_

#include "ndarray/kernel.h"

namespace mx::kernel {

// *dst = v, or *dst += v when add.
MX_XINLINE void Put(float* dst, float v, bool add) { *dst = add ? *dst + v : v; }

// Splits the flat range [begin, end) of rows of `row` elements into runs
// within one row and calls f(r, i, k, n) for each: row r, offset i in it,
// flat index k = r * row + i, n elements. Kernels that work row by row go
// through it, so that the CPU's inner loops (over n) vectorize.
template <typename F>
MX_XINLINE void ForEachRowRun(int64_t begin, int64_t end, int64_t row, F&& f) {
  for (int64_t k = begin; k < end;) {
    const int64_t r = k / row, i = k % row;
    const int64_t n = row - i < end - k ? row - i : end - k;
    f(r, i, k, n);
    k += n;
  }
}

// Activations with their derivative expressed through the output y:
// Backward(g, y) = g * dy/dx.
namespace op {
struct ReluAct {
  // NaN stays NaN, forward and backward, as in MXNet (mshadow_op.h's
  // relu and relu_grad): a diverging layer shows in the loss.
  MX_XINLINE static float Apply(float x) { return !(x <= 0) ? x : 0.0f; }
  // A select of an unconditionally loaded value vectorizes; g * (y > 0)
  // does not (GCC sees control flow) and mispredicts on random signs.
  MX_XINLINE static float Backward(float g, float y) { return y > 0 ? g : (y <= 0 ? 0.0f : y); }
};
struct SigmoidAct {
  MX_XINLINE static float Apply(float x) { return 1.0f / (1.0f + expf(-x)); }
  MX_XINLINE static float Backward(float g, float y) { return g * (y * (1.0f - y)); }
};
struct TanhAct {
  MX_XINLINE static float Apply(float x) { return tanhf(x); }
  MX_XINLINE static float Backward(float g, float y) { return g * (1.0f - y * y); }
};
struct SoftReluAct {
  // log(1 + e^x), computed stably.
  MX_XINLINE static float Apply(float x) {
    return x > 0 ? x + log1pf(expf(-x)) : log1pf(expf(x));
  }
  // sigmoid(x) = 1 - e^{-y}
  MX_XINLINE static float Backward(float g, float y) { return g * -expm1f(-y); }
};
struct SoftSignAct {
  MX_XINLINE static float Apply(float x) { return x / (1.0f + fabsf(x)); }
  // 1 / (1 + |x|)^2 = (1 - |y|)^2
  MX_XINLINE static float Backward(float g, float y) {
    const float d = 1.0f - fabsf(y);
    return g * (d * d);
  }
};
}  // namespace op

// y[i] (=|+=) A(x[i]).
template <typename A>
struct ActivationKernel {
  struct Params {
    float* y;
    const float* x;
    bool add;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    float* y = p.y;
    const float* x = p.x;
    if (p.add) {
      for (int64_t i = begin; i < end; ++i) y[i] += A::Apply(x[i]);
    } else {
      for (int64_t i = begin; i < end; ++i) y[i] = A::Apply(x[i]);
    }
  }
};

// gi[i] (=|+=) A::Backward(g[i], y[i]).
template <typename A>
struct ActivationGradKernel {
  struct Params {
    float* gi;
    const float* g;
    const float* y;
    bool add;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    float* gi = p.gi;
    const float* g = p.g;
    const float* y = p.y;
    if (p.add) {
      for (int64_t i = begin; i < end; ++i) gi[i] += A::Backward(g[i], y[i]);
    } else {
      for (int64_t i = begin; i < end; ++i) gi[i] = A::Backward(g[i], y[i]);
    }
  }
};

// out[i] (=|+=) in[i]: operators that only move elements (Flatten, Reshape).
struct CopyKernel {
  struct Params {
    float* out;
    const float* in;
    bool add;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    for (int64_t i = begin; i < end; ++i) Put(p.out + i, p.in[i], p.add);
  }
};

// Row r of `rows`: dst[r * dst_stride + k] (=|+=) src[r * src_stride + k]
// for k < len, one element per index: Concat's blocks, one launch per
// input.
struct StridedCopyKernel {
  struct Params {
    float* dst;
    const float* src;
    int64_t len, dst_stride, src_stride;
    bool add;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    ForEachRowRun(begin, end, p.len, [&](int64_t r, int64_t i, int64_t, int64_t n) {
      float* d = p.dst + r * p.dst_stride + i;
      const float* s = p.src + r * p.src_stride + i;
      for (int64_t k = 0; k < n; ++k) Put(d + k, s[k], p.add);
    });
  }
};

// out[i] (=|+=) in[offset of i] * scale, the offset from index.sa (a
// permutation of the input's strides: transpose; a kept shape's broadcast
// strides: the gradient of sum); index.sb is unused.
struct GatherKernel {
  struct Params {
    float* out;
    const float* in;
    BroadcastIndex index;
    bool add;
    float scale = 1.0f;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    const BroadcastIndex& ix = p.index;
    const int64_t step = ix.sa[ix.ndim - 1];
    BroadcastCursor c(ix, begin);
    for (int64_t i = begin; i < end;) {
      int64_t run = c.RunLeft(ix);
      if (run > end - i) run = end - i;
      const float* s = p.in + c.oa;
      for (int64_t k = 0; k < run; ++k) Put(p.out + i + k, s[k * step] * p.scale, p.add);
      i += run;
      c.Advance(ix, run);
    }
  }
};

// out[i] (=|+=) F(a[offset_a(i)], b[offset_b(i)]): BroadcastKernel with a
// request, element by element (broadcast operators asked to add).
template <typename F>
struct BroadcastPutKernel {
  struct Params {
    float* out;
    const float* a;
    const float* b;
    BroadcastIndex index;
    bool add;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    ForEachBroadcast(p.index, begin, end, [&](int64_t i, int64_t ia, int64_t ib) {
      Put(p.out + i, F::Apply(p.a[ia], p.b[ib]), p.add);
    });
  }
};

// One index per element j of an operand broadcast to a full shape (indices
// from MakeReductionIndices): out[j] (=|+=) scale * the sum, over the
// positions i of the full shape that j is broadcast to, of
//   F::GradA(g[i], self[j], other[i])   (for_a: the operand is F's left side)
//   F::GradB(g[i], other[i], self[j])   (otherwise)
// in double. The gradients of broadcast_* and, with F = op::Add (GradA is
// g), sum and mean. self and other may be null when F's derivatives do not
// read them.
template <typename F>
struct ReduceBroadcastKernel {
  struct Params {
    float* out;
    const float* g;
    const float* self;
    const float* other;
    BroadcastIndex outer, inner;
    float scale;
    bool for_a, add;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    int64_t positions = 1;
    for (int d = 0; d < p.inner.ndim; ++d) positions *= p.inner.shape[d];
    for (int64_t j = begin; j < end; ++j) {
      const BroadcastCursor at(p.outer, j);
      const float mine = p.self != nullptr ? p.self[j] : 0.0f;
      double sum = 0;
      ForEachBroadcast(p.inner, 0, positions, [&](int64_t, int64_t og, int64_t oo) {
        const float g = p.g[at.oa + og];
        const float theirs = p.other != nullptr ? p.other[at.ob + oo] : 0.0f;
        sum += p.for_a ? F::GradA(g, mine, theirs) : F::GradB(g, theirs, mine);
      });
      Put(p.out + j, static_cast<float>(sum * p.scale), p.add);
    }
  }
};

// The element-wise operators (elemwise_*, _*_scalar) with requests, and
// their gradients through the functors' GradA / GradB (ndarray/kernel.h).

// out[i] (=|+=) F(a[i], b[i]); b is a scalar (s) when b is null.
template <typename F>
struct BinaryPutKernel {
  struct Params {
    float* out;
    const float* a;
    const float* b;
    float s;
    bool add;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    for (int64_t i = begin; i < end; ++i) {
      Put(p.out + i, F::Apply(p.a[i], p.b != nullptr ? p.b[i] : p.s), p.add);
    }
  }
};

// ga[i] (=|+=) F::GradA(g[i], a[i], b[i]) and gb[i] likewise; a null ga or
// gb is not computed; b is the scalar s when null; a and b may be null
// when F's derivatives do not read them.
template <typename F>
struct BinaryGradKernel {
  struct Params {
    float* ga;
    float* gb;
    const float* g;
    const float* a;
    const float* b;
    float s;
    bool add_a, add_b;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    for (int64_t i = begin; i < end; ++i) {
      const float a = p.a != nullptr ? p.a[i] : 0.0f;
      const float b = p.b != nullptr ? p.b[i] : p.s;
      if (p.ga != nullptr) Put(p.ga + i, F::GradA(p.g[i], a, b), p.add_a);
      if (p.gb != nullptr) Put(p.gb + i, F::GradB(p.g[i], a, b), p.add_b);
    }
  }
};

// out[r, c] += bias[c] for a (rows, cols) output: FullyConnected's bias.
struct AddBiasKernel {
  struct Params {
    float* out;
    const float* bias;
    int64_t cols;
  };
  // Row by row, so the CPU's inner loop vectorizes.
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    ForEachRowRun(begin, end, p.cols, [&](int64_t, int64_t c0, int64_t k, int64_t n) {
      float* o = p.out + k;
      const float* b = p.bias + c0;
      for (int64_t j = 0; j < n; ++j) o[j] += b[j];
    });
  }
};

// Row r of a (rows, classes) input: y = softmax(x), with the maximum
// subtracted first. One row per index.
struct SoftmaxRowsKernel {
  struct Params {
    float* y;
    const float* x;
    int64_t classes;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    const int64_t classes = p.classes;
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = p.x + r * classes;
      float* yr = p.y + r * classes;
      float m = xr[0];
      for (int64_t c = 1; c < classes; ++c) m = xr[c] > m ? xr[c] : m;
      float sum = 0;
      for (int64_t c = 0; c < classes; ++c) {
        yr[c] = expf(xr[c] - m);
        sum += yr[c];
      }
      const float inv = 1.0f / sum;
      for (int64_t c = 0; c < classes; ++c) yr[c] *= inv;
    }
  }
};

// SoftmaxOutput's gradient: g[r, c] (=|+=) (prob[r, c] - [c == label[r]]) *
// scale, or 0 for rows whose label is `ignore` when use_ignore. With
// `valid` (normalization='valid' with use_ignore: the count of rows not
// ignored, ValidLabelKernel summed on the device), scale is divided by
// max(*valid, 1) too.
struct SoftmaxOutputGradKernel {
  struct Params {
    float* g;
    const float* prob;
    const float* label;
    int64_t classes;
    float scale, ignore;
    bool use_ignore, add;
    const float* valid;  // or null
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    const float scale = p.valid != nullptr ? p.scale / fmaxf(*p.valid, 1.0f) : p.scale;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / p.classes, c = i % p.classes;
      const float l = p.label[r];
      const bool skip = p.use_ignore && l == p.ignore;
      const float v =
          skip ? 0.0f : (p.prob[i] - (c == static_cast<int64_t>(l) ? 1.0f : 0.0f)) * scale;
      Put(p.g + i, v, p.add);
    }
  }
};

// valid[r] = 1 where label[r] is not `ignore`, else 0: summed (Reduce), the
// count SoftmaxOutputGradKernel's `valid` divides by.
struct ValidLabelKernel {
  struct Params {
    float* valid;
    const float* label;
    float ignore;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    for (int64_t r = begin; r < end; ++r) p.valid[r] = p.label[r] != p.ignore ? 1.0f : 0.0f;
  }
};

// ---- Pooling (graph/ops/pooling.cc) through the kernel layer: what cuDNN
// lacks on a GPU (sum, the 'full' convention) and cudnn_off=True. The same
// arithmetic in the same order as the operator's CPU code, so both give
// the same bits, ties and NaNs included: a window reduces each of its
// columns over its rows, then the columns left to right; max backward
// sends a window's gradient to its first maximum in row-major order.

// 2-D windows over planes of height x width: window (oy, ox) covers rows
// oy * s[0] - p[0] + [0, k[0]) and columns likewise (d 1), of which only
// the real ones (inside the plane) are read.
struct PoolWindows {
  enum Type { kMax, kAvg, kSum };  // graph/ops/pooling.cc's PoolType
  int64_t height, width, out_h, out_w;
  int64_t k[2], s[2], p[2];
  int type;        // Type
  bool count_pad;  // avg: divide by the window clipped to the padded data

  // The real positions [*lo, *hi) of window o along dimension d (size n).
  MX_XINLINE void Real(int d, int64_t o, int64_t n, int64_t* lo, int64_t* hi) const {
    const int64_t start = o * s[d] - p[d];
    *lo = start > 0 ? start : 0;
    *hi = start + k[d] < n ? start + k[d] : n;
  }
  // The windows [*first, *end) along dimension d (of `outs`) covering
  // position i: o * s - p <= i < o * s - p + k.
  MX_XINLINE void Covering(int d, int64_t i, int64_t outs, int64_t* first, int64_t* end) const {
    const int64_t before = i + p[d] - k[d];  // windows starting at or before it end before i
    *first = before < 0 ? 0 : before / s[d] + 1;
    const int64_t last = (i + p[d]) / s[d];
    *end = last + 1 < outs ? last + 1 : outs;
  }
  // avg's factor for window (oy, ox): 1 / its size, clipped to the padded
  // data (count_pad) or to the real data.
  MX_XINLINE float InvDivisor(int64_t oy, int64_t ox) const {
    const int64_t ey = Extent(0, oy, height), ex = Extent(1, ox, width);
    return 1.0f / static_cast<float>(ey * ex > 1 ? ey * ex : 1);
  }
  MX_XINLINE int64_t Extent(int d, int64_t o, int64_t n) const {
    int64_t lo, hi;
    Real(d, o, n, &lo, &hi);
    if (!count_pad) return hi > lo ? hi - lo : 0;
    const int64_t start = o * s[d] - p[d];
    return (start + k[d] < n + p[d] ? start + k[d] : n + p[d]) - start;
  }
  // std::max's choice: a unless a < b (a NaN in a stays).
  MX_XINLINE static float Max(float a, float b) { return a < b ? b : a; }
  // The window's value before any element: max's lowest float, or 0.
  MX_XINLINE float Init() const { return type == kMax ? -3.40282347e+38f : 0.0f; }
  // The flat plane offset of window (oy, ox)'s first maximum in row-major
  // order: each column's first maximum over the rows, then across columns
  // the larger, on a tie the smaller row, then the left one. -1 for a
  // window with no real element.
  MX_XINLINE int64_t ArgMax(const float* x, int64_t oy, int64_t ox) const {
    int64_t y0, y1, x0, x1;
    Real(0, oy, height, &y0, &y1);
    Real(1, ox, width, &x0, &x1);
    if (y0 >= y1 || x0 >= x1) return -1;
    int64_t best = -1, best_row = 0;
    float best_value = 0.0f;
    for (int64_t ix = x0; ix < x1; ++ix) {
      float col = x[y0 * width + ix];
      int64_t row = y0;
      for (int64_t iy = y0 + 1; iy < y1; ++iy) {
        if (x[iy * width + ix] > col) {
          col = x[iy * width + ix];
          row = iy;
        }
      }
      if (best < 0 || col > best_value || (col == best_value && row < best_row)) {
        best = ix;
        best_value = col;
        best_row = row;
      }
    }
    return best_row * width + best;
  }
};

// Pooling forward: y[i] (=|+=) the pooled window of output element i
// (planes x out_h x out_w).
struct PoolKernel {
  struct Params {
    float* y;
    const float* x;
    PoolWindows w;
    bool add;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    const PoolWindows& w = p.w;
    const bool max = w.type == PoolWindows::kMax;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t ox = i % w.out_w, oy = i / w.out_w % w.out_h;
      const float* x = p.x + i / (w.out_w * w.out_h) * w.height * w.width;
      int64_t y0, y1, x0, x1;
      w.Real(0, oy, w.height, &y0, &y1);
      w.Real(1, ox, w.width, &x0, &x1);
      float v = w.Init();
      for (int64_t ix = x0; ix < x1; ++ix) {
        float col = w.Init();
        for (int64_t iy = y0; iy < y1; ++iy) {
          const float e = x[iy * w.width + ix];
          col = max ? PoolWindows::Max(col, e) : col + e;
        }
        v = max ? PoolWindows::Max(v, col) : v + col;
      }
      if (w.type == PoolWindows::kAvg) v *= w.InvDivisor(oy, ox);
      Put(p.y + i, v, p.add);
    }
  }
};

// Pooling backward, gathered per input element i (planes x height x
// width), so that no two indices write one element: gx[i] (=|+=) the
// gradients of the windows covering it, in order of rows then columns of
// windows (max: those whose first maximum it is; avg: scaled by each
// window's InvDivisor). Within a window row, the windows' shares are summed
// before being added, as the CPU code adds a row of them at a time.
struct PoolGradKernel {
  struct Params {
    float* gx;
    const float* x;
    const float* gy;
    PoolWindows w;
    bool add;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    const PoolWindows& w = p.w;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t ix = i % w.width, iy = i / w.width % w.height;
      const int64_t plane = i / (w.width * w.height);
      const float* x = p.x + plane * w.height * w.width;
      const float* gy = p.gy + plane * w.out_h * w.out_w;
      int64_t oy0, oy1, ox0, ox1;
      w.Covering(0, iy, w.out_h, &oy0, &oy1);
      w.Covering(1, ix, w.out_w, &ox0, &ox1);
      float acc = p.add ? p.gx[i] : 0.0f;
      for (int64_t oy = oy0; oy < oy1; ++oy) {
        if (w.type == PoolWindows::kMax) {
          for (int64_t ox = ox0; ox < ox1; ++ox) {
            if (w.ArgMax(x, oy, ox) == iy * w.width + ix) acc += gy[oy * w.out_w + ox];
          }
          continue;
        }
        // The CPU code's column sum: window columns kx = 0, 1, ... (ox
        // descending); avg's scaling fused explicitly, as there.
        float col = 0.0f;
        for (int64_t ox = ox1 - 1; ox >= ox0; --ox) {
          const float g = gy[oy * w.out_w + ox];
          col = w.type == PoolWindows::kAvg ? fmaf(g, w.InvDivisor(oy, ox), col) : col + g;
        }
        acc += col;
      }
      p.gx[i] = acc;
    }
  }
};

// Dropout in training: element i is kept with probability `keep`, drawing
// from Philox at (seed, m), m its offset in the mask with the shared axes
// (index from MakeBroadcastIndex(data, mask, mask): sa maps element to
// mask). mask[i] = scale (1 / keep) or 0; y[i] (=|+=) x[i] * mask[i]. A
// draw depends on (seed, m) only, so any split of the range, on the CPU or
// a GPU, gives the same mask.
struct DropoutKernel {
  struct Params {
    float* y;
    float* mask;
    const float* x;
    BroadcastIndex index;
    uint64_t seed;
    float keep, scale;
    bool add;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    ForEachBroadcast(p.index, begin, end, [&](int64_t i, int64_t m, int64_t) {
      const float factor = UnitFloat(PhiloxAt(p.seed, m).v[0]) < p.keep ? p.scale : 0.0f;
      p.mask[i] = factor;
      Put(p.y + i, p.x[i] * factor, p.add);
    });
  }
};

// LeakyReLU's act types with a fixed slope: Apply(x, slope) and the
// derivative Grad(x, y, slope), from the output where it follows from it.
namespace op {
constexpr float kSeluAlpha = 1.6732632423543772848170429916717f;
constexpr float kSeluLambda = 1.0507009873554804934193349852946f;
constexpr float kSqrtHalf = 0.70710678118654752440f;    // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;  // 1 / sqrt(2 pi)

struct LeakyAct {
  MX_XINLINE static float Apply(float x, float s) { return x > 0 ? x : s * x; }
  MX_XINLINE static float Grad(float, float y, float s) { return y > 0 ? 1.0f : s; }
};
struct EluAct {
  MX_XINLINE static float Apply(float x, float s) { return x > 0 ? x : s * expm1f(x); }
  MX_XINLINE static float Grad(float, float y, float s) { return y > 0 ? 1.0f : y + s; }
};
struct SeluAct {
  MX_XINLINE static float Apply(float x, float) {
    return kSeluLambda * (x > 0 ? x : kSeluAlpha * expm1f(x));
  }
  MX_XINLINE static float Grad(float, float y, float) {
    return y > 0 ? kSeluLambda : y + kSeluLambda * kSeluAlpha;
  }
};
struct GeluAct {
  MX_XINLINE static float Apply(float x, float) { return 0.5f * x * (1.0f + erff(x * kSqrtHalf)); }
  MX_XINLINE static float Grad(float x, float, float) {
    const float cdf = 0.5f * (1.0f + erff(x * kSqrtHalf));
    return cdf + x * expf(-0.5f * x * x) * kInvSqrt2Pi;
  }
};
}  // namespace op

// y[i] (=|+=) A::Apply(x[i], slope).
template <typename A>
struct LeakyKernel {
  struct Params {
    float* y;
    const float* x;
    float slope;
    bool add;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    for (int64_t i = begin; i < end; ++i) Put(p.y + i, A::Apply(p.x[i], p.slope), p.add);
  }
};

// gi[i] (=|+=) g[i] * A::Grad(x[i], y[i], slope).
template <typename A>
struct LeakyGradKernel {
  struct Params {
    float* gi;
    const float* g;
    const float* x;
    const float* y;
    float slope;
    bool add;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    for (int64_t i = begin; i < end; ++i) {
      Put(p.gi + i, p.g[i] * A::Grad(p.x[i], p.y[i], p.slope), p.add);
    }
  }
};

// PReLU on data viewed as (outer, channels, inner): out[i] (=|+=) x[i] > 0 ?
// v[i] : gamma[c] * v[i], with c the channel of i (gamma of one element:
// all). v = x is the forward, v = g the input's gradient.
struct PreluKernel {
  struct Params {
    float* out;
    const float* v;
    const float* x;
    const float* gamma;
    int64_t channels, inner;
    bool add;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    for (int64_t i = begin; i < end; ++i) {
      const float a = p.gamma[p.channels == 1 ? 0 : (i / p.inner) % p.channels];
      Put(p.out + i, p.x[i] > 0 ? p.v[i] : a * p.v[i], p.add);
    }
  }
};

// PReLU's gamma gradient, one index per channel c: dgamma[c] (=|+=) the
// sum of g * x over the elements of channel c with x <= 0 (over all
// elements when channels == 1), accumulated in double.
struct PreluGammaGradKernel {
  struct Params {
    float* dgamma;
    const float* g;
    const float* x;
    int64_t n, channels, inner;
    bool add;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    const int64_t block = p.channels * p.inner;  // one sample's elements
    for (int64_t c = begin; c < end; ++c) {
      double sum = 0;
      for (int64_t base = c * p.inner; base < p.n; base += block) {
        const int64_t stop = p.channels == 1 ? p.n : base + p.inner;
        for (int64_t i = base; i < stop; ++i) {
          if (p.x[i] <= 0) sum += static_cast<double>(p.g[i]) * p.x[i];
        }
        if (p.channels == 1) break;
      }
      Put(p.dgamma + c, static_cast<float>(sum), p.add);
    }
  }
};

// The regression losses' data gradient: gi[i] (=|+=) scale * (y - label),
// or scale * sign(y - label) (sign(0) = -1) when mae.
struct RegressionGradKernel {
  struct Params {
    float* gi;
    const float* y;
    const float* label;
    float scale;
    bool mae, add;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    for (int64_t i = begin; i < end; ++i) {
      const float d = p.y[i] - p.label[i];
      Put(p.gi + i, (p.mae ? (d > 0 ? 1.0f : -1.0f) : d) * p.scale, p.add);
    }
  }
};

// Softmax over `classes` elements `inner` apart: data viewed as (outer,
// classes, inner), one softmax per index s in [0, outer * inner). y may be
// x. Sums in double.
struct SoftmaxStridedKernel {
  struct Params {
    float* y;
    const float* x;
    int64_t classes, inner;
    bool add;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t base = (s / p.inner) * p.classes * p.inner + s % p.inner;
      const float* x = p.x + base;
      float m = x[0];
      for (int64_t k = 1; k < p.classes; ++k) m = x[k * p.inner] > m ? x[k * p.inner] : m;
      double sum = 0;
      for (int64_t k = 0; k < p.classes; ++k) sum += expf(x[k * p.inner] - m);
      const float inv = static_cast<float>(1.0 / sum);
      for (int64_t k = 0; k < p.classes; ++k) {
        const float v = expf(x[k * p.inner] - m) * inv;
        Put(p.y + base + k * p.inner, v, p.add);
      }
    }
  }
};

// SoftmaxStridedKernel's gradient through its output: gi = y * (g -
// sum(g * y)) per softmax.
struct SoftmaxStridedGradKernel {
  struct Params {
    float* gi;
    const float* g;
    const float* y;
    int64_t classes, inner;
    bool add;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t base = (s / p.inner) * p.classes * p.inner + s % p.inner;
      double dot = 0;
      for (int64_t k = 0; k < p.classes; ++k) {
        const int64_t j = base + k * p.inner;
        dot += static_cast<double>(p.g[j]) * p.y[j];
      }
      for (int64_t k = 0; k < p.classes; ++k) {
        const int64_t j = base + k * p.inner;
        Put(p.gi + j, p.y[j] * (p.g[j] - static_cast<float>(dot)), p.add);
      }
    }
  }
};

// Embedding's row for a float index: truncated, clipped to [0, rows)
// (negative, zero and NaN read row 0), as MXNet does.
MX_XINLINE int64_t EmbeddingRow(float index, int64_t rows) {
  if (!(index > 0)) return 0;
  if (index >= static_cast<float>(rows - 1)) return rows - 1;
  return static_cast<int64_t>(index);
}

// Embedding's lookup: out[i, k] (=|+=) weight[row(index[i]), k] for n
// indices and rows of `dim` elements; one output element per index.
struct EmbeddingKernel {
  struct Params {
    float* out;
    const float* index;
    const float* weight;
    int64_t rows, dim;
    bool add;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    ForEachRowRun(begin, end, p.dim, [&](int64_t r, int64_t k0, int64_t e, int64_t n) {
      const float* row = p.weight + EmbeddingRow(p.index[r], p.rows) * p.dim + k0;
      for (int64_t k = 0; k < n; ++k) Put(p.out + e + k, row[k], p.add);
    });
  }
};

// Embedding's weight gradient, added: gw[row(index[i]), k] += g[i, k] for
// every index i. One index per column k: each column's sums are one
// thread's, in index order, so the result needs no atomics and does not
// depend on the split (the CPU takes all columns at once, row by row).
struct EmbeddingGradKernel {
  struct Params {
    float* gw;
    const float* index;
    const float* g;
    int64_t n, rows, dim;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    for (int64_t i = 0; i < p.n; ++i) {
      float* dst = p.gw + EmbeddingRow(p.index[i], p.rows) * p.dim;
      const float* src = p.g + i * p.dim;
      for (int64_t k = begin; k < end; ++k) dst[k] += src[k];
    }
  }
};

// Channels per block of the blocked layout (graph/op.h's TBlob::blocked,
// oneDNN's nChw16c): (N, C, H, W) stored as (N, C / 16, H, W, 16).
constexpr int64_t kChannelBlock = 16;

// Calls f(j, c, len) over [k, k + n) of a blocked array cut at block
// boundaries: elements j .. j + len - 1 are channels c .. c + len - 1 of
// one block (rows of blocked data start at multiples of kChannelBlock).
template <typename F>
MX_XINLINE void ForEachBlockRun(int64_t k, int64_t n, F&& f) {
  for (int64_t j = k; j < k + n;) {
    const int64_t c = j % kChannelBlock;
    const int64_t len = kChannelBlock - c < k + n - j ? kChannelBlock - c : k + n - j;
    f(j, c, len);
    j += len;
  }
}

// Where element k of channel c of image n lies in a blocked array of
// `channels` channels of `plane` elements each.
MX_XINLINE int64_t BlockedIndex(int64_t channels, int64_t plane, int64_t n, int64_t c, int64_t k) {
  return ((n * (channels / kChannelBlock) + c / kChannelBlock) * plane + k) * kChannelBlock +
         c % kChannelBlock;
}

// A row-major copy of a blocked (N, C, H, W) array: out[i] for row-major
// index i, with plane = H * W.
struct UnblockKernel {
  struct Params {
    float* out;
    const float* in;
    int64_t channels, plane;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / (p.channels * p.plane), c = i / p.plane % p.channels, k = i % p.plane;
      p.out[i] = p.in[BlockedIndex(p.channels, p.plane, n, c, k)];
    }
  }
};

// BatchNorm. Data is viewed as (outer, channels, inner) around the channel
// axis, row-major or (4-D data, axis 1) blocked as (outer, channels / 16,
// inner, 16). A channel's sums are taken in `parts` slices of its elements,
// one index per (channel, part) (blocked: per block of 16 channels and
// part), into partial sums (in double; BnPartsKernel), which one index per
// channel then combines: the GPU thus runs channels x parts threads, not
// one per channel. Per-channel values live in a table of kBnColumns arrays
// of `channels` floats, read by the element-wise kernels. Both live in the
// operator's workspace. Both layouts give the same bits.
struct BnLayout {
  int64_t outer, channels, inner;
  // 1: row-major; kChannelBlock: blocked.
  int64_t block = 1;
  MX_XINLINE int64_t PerChannel() const { return outer * inner; }
  // What BnPartsKernel runs `parts` indices for: channels, or blocks.
  MX_XINLINE int64_t Groups() const { return channels / block; }
  // Where element k of channel c's outer slice o lies in blocked data.
  MX_XINLINE int64_t BlockedAt(int64_t o, int64_t c, int64_t k) const {
    return BlockedIndex(channels, inner, o, c, k);
  }
};

// Columns of the per-channel table.
enum BnColumn { kBnMean, kBnVar, kBnScale, kBnMeanGrad, kBnProj, kBnColumns };

// What BnPartsKernel sums over a slice of channel c: the moments (x, and
// (x - m)^2 about the slice's own mean m); or g and g * (x - center[c]).
enum BnSum { kBnMoments, kBnSumGrad };

MX_XINLINE float BnInvStd(float var, float eps) {
  // MXNet's convention for a constant channel without eps: no scaling.
  return var + eps == 0 ? 0.0f : 1.0f / sqrtf(var + eps);
}

// Sums in double over kBnLanes interleaved lanes: element k of a run goes
// to lane k % kBnLanes. One running sum is one chain of dependent additions
// (one per 4 cycles, and BatchNorm took 38% of the zoo ResNet's CPU step);
// independent lanes vectorize. The lanes are added in a fixed order
// (BnLaneTotal), so a sum depends only on the layout, never on the machine,
// and the GPU, which runs the same code per index, gets the same bits.
constexpr int kBnLanes = 8;

template <typename F>
MX_XINLINE void BnAddLanes(int64_t n, double* lanes, F&& term) {
  int64_t k = 0;
  for (; k + kBnLanes <= n; k += kBnLanes) {
    for (int u = 0; u < kBnLanes; ++u) lanes[u] += term(k + u);
  }
  for (; k < n; ++k) lanes[k % kBnLanes] += term(k);
}

MX_XINLINE double BnLaneTotal(const double* l) {
  static_assert(kBnLanes == 8, "BnLaneTotal adds eight lanes");
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

// Slice `part` of a channel's per_channel elements cut into `parts`:
// elements [*first, *last), empty for the trailing parts when the slices
// (rounded up) run out first.
MX_XINLINE void BnSlice(int64_t per_channel, int64_t parts, int64_t part, int64_t* first,
                        int64_t* last) {
  const int64_t slice = (per_channel + parts - 1) / parts;
  *first = part * slice < per_channel ? part * slice : per_channel;
  *last = *first + slice < per_channel ? *first + slice : per_channel;
}

// Index j = c * parts + part sums its slice of channel c's elements into
// partials[2j] and partials[2j + 1], walking runs of `inner` contiguous
// elements. kBnMoments reads the slice twice, the second time from cache
// (slices are about 512 elements): its sum, then the squares about its own
// mean; BnMomentsKernel combines the slices (Chan et al.'s parallel
// variance), so the statistics take one pass over the data, not two, and
// stay as exact as two passes.
struct BnPartsKernel {
  struct Params {
    double* partials;
    const float* x;
    const float* g;       // kBnSumGrad only
    const float* center;  // per channel; kBnSumGrad only
    BnLayout layout;
    int64_t parts;
    BnSum what;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    const BnLayout& l = p.layout;
    for (int64_t j = begin; j < end; ++j) {
      if (l.block != 1) {
        Blocked(j, p);
        continue;
      }
      const int64_t c = j / p.parts;
      int64_t first, last;
      BnSlice(l.PerChannel(), p.parts, j % p.parts, &first, &last);
      double a[kBnLanes] = {}, b[kBnLanes] = {};
      if (p.what == kBnMoments) {
        ForEachRowRun(first, last, l.inner, [&](int64_t o, int64_t i, int64_t, int64_t run) {
          const float* x = p.x + (o * l.channels + c) * l.inner + i;
          BnAddLanes(run, a, [&](int64_t k) { return static_cast<double>(x[k]); });
        });
        const double m = last > first ? BnLaneTotal(a) / static_cast<double>(last - first) : 0.0;
        ForEachRowRun(first, last, l.inner, [&](int64_t o, int64_t i, int64_t, int64_t run) {
          const float* x = p.x + (o * l.channels + c) * l.inner + i;
          BnAddLanes(run, b, [&](int64_t k) {
            const double d = x[k] - m;
            return d * d;
          });
        });
      } else {
        const float m = p.center[c];
        ForEachRowRun(first, last, l.inner, [&](int64_t o, int64_t i, int64_t, int64_t run) {
          const float* x = p.x + (o * l.channels + c) * l.inner + i;
          const float* g = p.g + (o * l.channels + c) * l.inner + i;
          BnAddLanes(run, a, [&](int64_t k) { return static_cast<double>(g[k]); });
          BnAddLanes(run, b, [&](int64_t k) { return static_cast<double>(g[k]) * (x[k] - m); });
        });
      }
      p.partials[2 * j] = BnLaneTotal(a);
      p.partials[2 * j + 1] = BnLaneTotal(b);
    }
  }

  // On blocked data: index j = block * parts + part sums the slice of the
  // block's 16 channels at once (each element one vector of them). Each
  // channel's terms go to the lanes, in the order, of the row-major
  // kernel, so the sums are the same to the bit.
  MX_XINLINE static void Blocked(int64_t j, const Params& p) {
    constexpr int64_t B = kChannelBlock;
    const BnLayout& l = p.layout;
    const int64_t block = j / p.parts, part = j % p.parts;
    int64_t first, last;
    BnSlice(l.PerChannel(), p.parts, part, &first, &last);
    double a[kBnLanes][B] = {}, b[kBnLanes][B] = {};
    // f(lane, at) for each element of the slice: `at` is its channel 0.
    auto each = [&](auto&& f) {
      ForEachRowRun(first, last, l.inner, [&](int64_t o, int64_t i, int64_t, int64_t run) {
        const int64_t at = l.BlockedAt(o, block * B, i);
        for (int64_t k = 0; k < run; ++k) f(static_cast<int>(k % kBnLanes), at + k * B);
      });
    };
    if (p.what == kBnMoments) {
      each([&](int u, int64_t at) {
        for (int64_t c = 0; c < B; ++c) a[u][c] += static_cast<double>(p.x[at + c]);
      });
      double m[B];
      for (int64_t c = 0; c < B; ++c) {
        m[c] = last > first ? Total(a, c) / static_cast<double>(last - first) : 0.0;
      }
      each([&](int u, int64_t at) {
        for (int64_t c = 0; c < B; ++c) {
          const double d = p.x[at + c] - m[c];
          b[u][c] += d * d;
        }
      });
    } else {
      const float* m = p.center + block * B;
      each([&](int u, int64_t at) {
        for (int64_t c = 0; c < B; ++c) {
          a[u][c] += static_cast<double>(p.g[at + c]);
          b[u][c] += static_cast<double>(p.g[at + c]) * (p.x[at + c] - m[c]);
        }
      });
    }
    for (int64_t c = 0; c < B; ++c) {
      const int64_t to = 2 * ((block * B + c) * p.parts + part);
      p.partials[to] = Total(a, c);
      p.partials[to + 1] = Total(b, c);
    }
  }

  // BnLaneTotal of channel c's lanes.
  MX_XINLINE static double Total(const double (*lanes)[kChannelBlock], int64_t c) {
    double l[kBnLanes];
    for (int u = 0; u < kBnLanes; ++u) l[u] = lanes[u][c];
    return BnLaneTotal(l);
  }
};

// The sum of channel c's partials (first or, with second, second of each
// pair).
MX_XINLINE double BnCombine(const double* partials, int64_t c, int64_t parts, bool second) {
  double sum = 0;
  for (int64_t k = 0; k < parts; ++k) sum += partials[2 * (c * parts + k) + (second ? 1 : 0)];
  return sum;
}

// One index per channel: the table's batch mean and (biased) variance from
// the kBnMoments partials of its slices: with slice k holding n_k elements
// of sum s_k and squares q_k about its mean s_k / n_k, mean = sum(s_k) / n
// and var = (sum(q_k) + sum(n_k (s_k / n_k - mean)^2)) / n.
struct BnMomentsKernel {
  struct Params {
    float* table;
    const double* partials;
    BnLayout layout;
    int64_t parts;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    const int64_t per_channel = p.layout.PerChannel(), C = p.layout.channels;
    const double n = static_cast<double>(per_channel);
    for (int64_t c = begin; c < end; ++c) {
      const double* q = p.partials + 2 * c * p.parts;
      const double mean = BnCombine(p.partials, c, p.parts, false) / n;
      double m2 = 0;
      for (int64_t k = 0; k < p.parts; ++k) {
        int64_t first, last;
        BnSlice(per_channel, p.parts, k, &first, &last);
        if (first == last) continue;  // an empty slice adds nothing
        const double nk = static_cast<double>(last - first);
        const double d = q[2 * k] / nk - mean;
        m2 += q[2 * k + 1] + nk * d * d;
      }
      p.table[kBnMean * C + c] = static_cast<float>(mean);
      p.table[kBnVar * C + c] = static_cast<float>(m2 / n);
    }
  }
};

// Forward statistics, one index per channel: the mean and variance that
// normalise (the batch's, already in the table, when batch_stats, which
// also updates the moving ones with `momentum`; else the moving ones, put
// in the table) and scale = gamma * invstd (gamma taken as 1 when
// fix_gamma); out_mean / out_var (=|+=) them when not null
// (output_mean_var).
struct BnStatsKernel {
  struct Params {
    float* table;
    float* moving_mean;
    float* moving_var;
    float* out_mean;
    float* out_var;
    const float* gamma;
    int64_t channels;
    float eps, momentum;
    bool batch_stats, fix_gamma, add_mean, add_var;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    const int64_t C = p.channels;
    for (int64_t c = begin; c < end; ++c) {
      float mean, var;
      if (p.batch_stats) {
        mean = p.table[kBnMean * C + c];
        var = p.table[kBnVar * C + c];
        p.moving_mean[c] = p.moving_mean[c] * p.momentum + mean * (1 - p.momentum);
        p.moving_var[c] = p.moving_var[c] * p.momentum + var * (1 - p.momentum);
      } else {
        mean = p.moving_mean[c];
        var = p.moving_var[c];
      }
      p.table[kBnMean * C + c] = mean;
      p.table[kBnVar * C + c] = var;
      p.table[kBnScale * C + c] = (p.fix_gamma ? 1.0f : p.gamma[c]) * BnInvStd(var, p.eps);
      if (p.out_mean != nullptr) Put(p.out_mean + c, mean, p.add_mean);
      if (p.out_var != nullptr) Put(p.out_var + c, var, p.add_var);
    }
  }
};

// y (=|+=) (x - mean[c]) * scale[c] + beta[c], in runs of one channel.
struct BnApplyKernel {
  struct Params {
    float* y;
    const float* x;
    const float* table;
    const float* beta;
    BnLayout layout;
    bool add;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    const int64_t C = p.layout.channels, B = p.layout.block;
    ForEachRowRun(begin, end, p.layout.inner * B, [&](int64_t r, int64_t, int64_t k, int64_t n) {
      const int64_t c = r % p.layout.Groups() * B;  // the row's (first) channel
      if (B == 1) {
        const float m = p.table[kBnMean * C + c], scale = p.table[kBnScale * C + c];
        const float b = p.beta[c];
        for (int64_t j = k; j < k + n; ++j) Put(p.y + j, (p.x[j] - m) * scale + b, p.add);
        return;
      }
      // Copies: y might alias the table as far as the compiler knows.
      float m[kChannelBlock], scale[kChannelBlock], b[kChannelBlock];
      for (int64_t u = 0; u < kChannelBlock; ++u) {
        m[u] = p.table[kBnMean * C + c + u];
        scale[u] = p.table[kBnScale * C + c + u];
        b[u] = p.beta[c + u];
      }
      ForEachBlockRun(k, n, [&](int64_t j, int64_t c0, int64_t len) {
        for (int64_t u = 0; u < len; ++u) {
          Put(p.y + j + u, (p.x[j + u] - m[c0 + u]) * scale[c0 + u] + b[c0 + u], p.add);
        }
      });
    });
  }
};

// Backward statistics, one index per channel, from the partial sums of g
// and g * (x - mean) (kBnSumGrad about `mean`: the batch's, in the table,
// or the moving one) and the variance `var` (likewise). With sum_g and dot
// those sums: dgamma (=|+=) dot * invstd (0 when fix_gamma), dbeta (=|+=)
// sum_g (each skipped when null), and the coefficients of dx: the table's
// mean and scale = gamma * invstd, and with batch statistics mean_grad =
// mean(g), proj = mean(g * (x - mean)) * invstd^2 (0 for global
// statistics, which dx does not depend on).
struct BnGradStatsKernel {
  struct Params {
    float* table;
    float* dgamma;
    float* dbeta;
    const double* partials;
    const float* gamma;
    const float* mean;
    const float* var;
    BnLayout layout;
    int64_t parts;
    float eps;
    bool batch_stats, fix_gamma, add_gamma, add_beta;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    const int64_t C = p.layout.channels;
    const double n = static_cast<double>(p.layout.PerChannel());
    for (int64_t c = begin; c < end; ++c) {
      const double sum_g = BnCombine(p.partials, c, p.parts, false);
      const double dot = BnCombine(p.partials, c, p.parts, true);
      const float invstd = BnInvStd(p.var[c], p.eps);
      const float mean = p.mean[c];
      p.table[kBnMean * C + c] = mean;
      p.table[kBnScale * C + c] = (p.fix_gamma ? 1.0f : p.gamma[c]) * invstd;
      p.table[kBnMeanGrad * C + c] = p.batch_stats ? static_cast<float>(sum_g / n) : 0.0f;
      p.table[kBnProj * C + c] =
          p.batch_stats ? static_cast<float>(dot / n) * invstd * invstd : 0.0f;
      if (p.dgamma != nullptr) {
        Put(p.dgamma + c, p.fix_gamma ? 0.0f : static_cast<float>(dot) * invstd, p.add_gamma);
      }
      if (p.dbeta != nullptr) Put(p.dbeta + c, static_cast<float>(sum_g), p.add_beta);
    }
  }
};

// dx (=|+=) (g - mean_grad[c] - (x - mean[c]) * proj[c]) * scale[c], in
// runs of one channel.
struct BnGradApplyKernel {
  struct Params {
    float* dx;
    const float* g;
    const float* x;
    const float* table;
    BnLayout layout;
    bool add;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    const int64_t C = p.layout.channels, B = p.layout.block;
    ForEachRowRun(begin, end, p.layout.inner * B, [&](int64_t r, int64_t, int64_t k, int64_t n) {
      const int64_t c = r % p.layout.Groups() * B;  // the row's (first) channel
      if (B == 1) {
        const float m = p.table[kBnMean * C + c], scale = p.table[kBnScale * C + c];
        const float mg = p.table[kBnMeanGrad * C + c], proj = p.table[kBnProj * C + c];
        for (int64_t j = k; j < k + n; ++j) {
          Put(p.dx + j, (p.g[j] - mg - (p.x[j] - m) * proj) * scale, p.add);
        }
        return;
      }
      // Copies: dx might alias the table as far as the compiler knows.
      float m[kChannelBlock], scale[kChannelBlock], mg[kChannelBlock], proj[kChannelBlock];
      for (int64_t u = 0; u < kChannelBlock; ++u) {
        m[u] = p.table[kBnMean * C + c + u];
        scale[u] = p.table[kBnScale * C + c + u];
        mg[u] = p.table[kBnMeanGrad * C + c + u];
        proj[u] = p.table[kBnProj * C + c + u];
      }
      ForEachBlockRun(k, n, [&](int64_t j, int64_t c0, int64_t len) {
        for (int64_t u = 0; u < len; ++u) {
          const int64_t i = j + u, ch = c0 + u;
          Put(p.dx + i, (p.g[i] - mg[ch] - (p.x[i] - m[ch]) * proj[ch]) * scale[ch], p.add);
        }
      });
    });
  }
};

}  // namespace mx::kernel

#endif  // MX_NDARRAY_NN_KERNELS_H_
