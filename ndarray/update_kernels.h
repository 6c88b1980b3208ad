// The optimizers' update rules as kernels of the kernel layer (see
// ndarray/kernel.h): one source for the CPU and the GPU. kvstore/optimizer.h
// states the rules (MXNet 1.x's) and owns the hyper-parameters; here each
// rule is a struct with plain-data Args and
//
//   MX_XINLINE static void Apply(const Args&, float& w, float g, float& s0, float& s1)
//
// that updates one element of the weight and of its kStates state arrays
// (unused references point at a dummy). UpdateKernel<Rule> runs it over an
// array. This header includes no CUDA or abseil header.
#ifndef MX_NDARRAY_UPDATE_KERNELS_H_
#define MX_NDARRAY_UPDATE_KERNELS_H_

#include "ndarray/kernel.h"

namespace mx::kernel {

// MXNet's clip::Map(x, c) when c >= 0; no clipping when c < 0.
MX_XINLINE float ClipIf(float x, float c) {
  if (c < 0) return x;
  return x > c ? c : (x < -c ? -c : x);
}

template <typename Rule>
struct UpdateKernel {
  struct Params {
    float* w;
    const float* g;
    float* s0;  // null when Rule::kStates < 1
    float* s1;  // null when Rule::kStates < 2
    typename Rule::Args args;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    // Local restrict copies: a store to w[i] could otherwise alias the
    // arguments, which keeps the CPU loop scalar.
    const typename Rule::Args a = p.args;
    float* __restrict__ w = p.w;
    const float* __restrict__ g = p.g;
    float* __restrict__ s0 = p.s0;
    float* __restrict__ s1 = p.s1;
    for (int64_t i = begin; i < end; ++i) {
      float unused0 = 0, unused1 = 0;
      Rule::Apply(a, w[i], g[i], Rule::kStates > 0 ? s0[i] : unused0,
                  Rule::kStates > 1 ? s1[i] : unused1);
    }
  }
};

// The lazy update of a row-sparse gradient (MXNet's lazy_update): Rule
// applied to the rows of the weight and states that the gradient stores.
// Element (r, c) of the compact gradient (rows x dim) updates element
// (pos[r], c); rows not in pos are not touched.
template <typename Rule>
struct RowUpdateKernel {
  struct Params {
    float* w;
    const float* g;
    float* s0;
    float* s1;
    const int64_t* pos;
    int64_t dim;
    typename Rule::Args args;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    const typename Rule::Args a = p.args;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / p.dim;
      const int64_t j = p.pos[r] * p.dim + (i - r * p.dim);
      float unused0 = 0, unused1 = 0;
      Rule::Apply(a, p.w[j], p.g[i], Rule::kStates > 0 ? p.s0[j] : unused0,
                  Rule::kStates > 1 ? p.s1[j] : unused1);
    }
  }
};

// lr times the rescaled, clipped gradient, associated as MXNet does.
struct SgdStep {
  float lr, rescale, clip, lr_rescale;
  MX_XINLINE float operator()(float g) const {
    return clip >= 0 ? lr * ClipIf(rescale * g, clip) : lr_rescale * g;
  }
};

struct SgdRule {
  static constexpr int kStates = 0;
  struct Args {
    SgdStep step;
    float lr, wd;
  };
  MX_XINLINE static void Apply(const Args& a, float& w, float g, float&, float&) {
    w = (1.f - a.lr * a.wd) * w - a.step(g);
  }
};

struct SgdMomentumRule {
  static constexpr int kStates = 1;
  struct Args {
    SgdStep step;
    float lr, wd, momentum;
  };
  MX_XINLINE static void Apply(const Args& a, float& w, float g, float& m, float&) {
    m = a.momentum * m - a.lr * a.wd * w - a.step(g);
    w = w + m;
  }
};

struct NagRule {
  static constexpr int kStates = 1;
  struct Args {
    float lr, wd, rescale, clip, momentum;
  };
  MX_XINLINE static void Apply(const Args& a, float& w, float g, float& m, float&) {
    const float gs = ClipIf(a.rescale * g, a.clip);
    const float decay = a.wd * w;
    m = a.momentum * m + gs + decay;
    w = w - a.lr * (a.momentum * m + gs + decay);
  }
};

struct AdamRule {
  static constexpr int kStates = 2;
  struct Args {
    float lr_t, wd, rescale, clip, beta1, beta2, epsilon;
  };
  MX_XINLINE static void Apply(const Args& a, float& w, float g, float& mean, float& var) {
    const float gr = ClipIf(g * a.rescale + w * a.wd, a.clip);
    mean = a.beta1 * mean + (1.f - a.beta1) * gr;
    var = a.beta2 * var + (1.f - a.beta2) * (gr * gr);
    w = w - a.lr_t * mean / (sqrtf(var) + a.epsilon);
  }
};

struct AdaGradRule {
  static constexpr int kStates = 1;
  struct Args {
    float lr, wd, rescale, clip, eps;
  };
  MX_XINLINE static void Apply(const Args& a, float& w, float g, float& history, float&) {
    const float gs = ClipIf(g * a.rescale, a.clip);
    history += gs * gs;
    const float div = gs / sqrtf(history + a.eps);
    w += (div + w * a.wd) * -a.lr;
  }
};

struct RmsPropRule {
  static constexpr int kStates = 1;
  struct Args {
    float lr, wd, rescale, clip, gamma1, epsilon, clip_weights;
  };
  MX_XINLINE static void Apply(const Args& a, float& w, float g, float& n, float&) {
    const float gr = ClipIf(a.rescale * g + a.wd * w, a.clip);
    n = (1.f - a.gamma1) * (gr * gr) + a.gamma1 * n;
    w = ClipIf(w - a.lr * (gr / sqrtf(n + a.epsilon)), a.clip_weights);
  }
};

struct AdaDeltaRule {
  static constexpr int kStates = 2;
  struct Args {
    float wd, rescale, clip, rho, epsilon;
  };
  MX_XINLINE static void Apply(const Args& a, float& w, float g, float& acc_g,
                               float& acc_delta) {
    const float gs = ClipIf(g * a.rescale, a.clip);
    acc_g = acc_g * a.rho + (1.f - a.rho) * gs * gs;
    const float delta = sqrtf(acc_delta + a.epsilon) / sqrtf(acc_g + a.epsilon) * gs;
    acc_delta = acc_delta * a.rho + (1.f - a.rho) * delta * delta;
    w -= delta + a.wd * w;
  }
};

}  // namespace mx::kernel

#endif  // MX_NDARRAY_UPDATE_KERNELS_H_
