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

// Activations with their derivative expressed through the output y:
// Backward(g, y) = g * dy/dx.
namespace op {
struct ReluAct {
  MX_XINLINE static float Apply(float x) { return x > 0 ? x : 0.0f; }
  // A select of an unconditionally loaded value vectorizes; g * (y > 0)
  // does not (GCC sees control flow) and mispredicts on random signs.
  MX_XINLINE static float Backward(float g, float y) { return y > 0 ? g : 0.0f; }
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
    for (int64_t i = begin; i < end;) {
      const int64_t c0 = i % p.cols;
      const int64_t run = p.cols - c0 < end - i ? p.cols - c0 : end - i;
      float* o = p.out + i;
      const float* b = p.bias + c0;
      for (int64_t j = 0; j < run; ++j) o[j] += b[j];
      i += run;
    }
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
// scale, or 0 for rows whose label is `ignore` when use_ignore.
struct SoftmaxOutputGradKernel {
  struct Params {
    float* g;
    const float* prob;
    const float* label;
    int64_t classes;
    float scale, ignore;
    bool use_ignore, add;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / p.classes, c = i % p.classes;
      const float l = p.label[r];
      const bool skip = p.use_ignore && l == p.ignore;
      const float v =
          skip ? 0.0f : (p.prob[i] - (c == static_cast<int64_t>(l) ? 1.0f : 0.0f)) * p.scale;
      Put(p.g + i, v, p.add);
    }
  }
};

}  // namespace mx::kernel

#endif  // MX_NDARRAY_NN_KERNELS_H_
