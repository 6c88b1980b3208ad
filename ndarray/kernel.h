// One kernel source for CPU and GPU.
//
// A kernel is a struct with a plain-data `Params` and a function
//
//   MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p)
//
// that computes elements [begin, end) of its output, reading and writing only
// through pointers in p. Everything it calls is MX_XINLINE too, so nvcc
// compiles the very same body for the device, and the CPU tests run every
// line the GPU runs. ndarray/launch.h runs a kernel over [0, n):
//
//  - on a CPU context, as one call MapRange(0, n) on the calling thread,
//    or from kSplitElements (2^16) elements' work on as calls over
//    contiguous ranges on the CPU pool (ndarray/parallel.h); the loops
//    inline and vectorize like hand-written ones;
//  - on gpu(i), as a CUDA kernel on that device's compute stream, in which
//    each thread calls MapRange(i, i + 1) for its grid-stride indices i.
//
// Reductions are written once as reducer functors (Init, Reduce, Combine,
// Finalize); the CPU and GPU loops around them differ (a GPU block combines
// its threads' partial results), the arithmetic does not.
//
// This header includes no CUDA or abseil header: nvcc compiles it as is.
#ifndef MX_NDARRAY_KERNEL_H_
#define MX_NDARRAY_KERNEL_H_

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define MX_XINLINE __host__ __device__ __forceinline__
#else
#define MX_XINLINE inline __attribute__((always_inline))
#endif

namespace mx::kernel {

// ---- Element-wise functions of one or two floats.

// Binary functions carry their partial derivatives for the operators'
// backward passes: GradA(g, a, b) = g * d/da F(a, b), GradB likewise;
// kGradUsesInputs says whether those read a or b, kGradAUsesA whether GradA
// reads a (an operator with a scalar b keeps its input only then).
namespace op {
struct Add {
  static constexpr bool kGradAUsesA = false;
  static constexpr bool kGradUsesInputs = false;
  MX_XINLINE static float Apply(float a, float b) { return a + b; }
  MX_XINLINE static float GradA(float g, float, float) { return g; }
  MX_XINLINE static float GradB(float g, float, float) { return g; }
};
struct Sub {
  static constexpr bool kGradAUsesA = false;
  static constexpr bool kGradUsesInputs = false;
  MX_XINLINE static float Apply(float a, float b) { return a - b; }
  MX_XINLINE static float GradA(float g, float, float) { return g; }
  MX_XINLINE static float GradB(float g, float, float) { return -g; }
};
struct Mul {
  static constexpr bool kGradAUsesA = false;
  static constexpr bool kGradUsesInputs = true;
  MX_XINLINE static float Apply(float a, float b) { return a * b; }
  MX_XINLINE static float GradA(float g, float, float b) { return g * b; }
  MX_XINLINE static float GradB(float g, float a, float) { return g * a; }
};
struct Div {
  static constexpr bool kGradAUsesA = false;
  static constexpr bool kGradUsesInputs = true;
  MX_XINLINE static float Apply(float a, float b) { return a / b; }
  MX_XINLINE static float GradA(float g, float, float b) { return g / b; }
  MX_XINLINE static float GradB(float g, float a, float b) { return -g * a / (b * b); }
};
// b - a and b / a: a scalar on the left (s - x, s / x).
struct RSub {
  static constexpr bool kGradAUsesA = false;
  static constexpr bool kGradUsesInputs = false;
  MX_XINLINE static float Apply(float a, float b) { return b - a; }
  MX_XINLINE static float GradA(float g, float, float) { return -g; }
  MX_XINLINE static float GradB(float g, float, float) { return g; }
};
struct RDiv {
  static constexpr bool kGradAUsesA = true;
  static constexpr bool kGradUsesInputs = true;
  MX_XINLINE static float Apply(float a, float b) { return b / a; }
  MX_XINLINE static float GradA(float g, float a, float b) { return -g * b / (a * a); }
  MX_XINLINE static float GradB(float g, float a, float) { return g / a; }
};
// NaN wins, as in MXNet (mshadow_op.h): a diverging value must not turn
// into a number on its way to the loss.
struct Max {
  MX_XINLINE static float Apply(float a, float b) { return a > b || a != a ? a : b; }
};
struct Min {
  MX_XINLINE static float Apply(float a, float b) { return a < b || a != a ? a : b; }
};

struct Exp { MX_XINLINE static float Apply(float x) { return expf(x); } };
struct Log { MX_XINLINE static float Apply(float x) { return logf(x); } };
struct Sqrt { MX_XINLINE static float Apply(float x) { return sqrtf(x); } };
struct Square { MX_XINLINE static float Apply(float x) { return x * x; } };
struct Abs { MX_XINLINE static float Apply(float x) { return fabsf(x); } };
struct Sign {
  MX_XINLINE static float Apply(float x) { return x > 0 ? 1.0f : (x < 0 ? -1.0f : 0.0f); }
};
struct Relu {
  MX_XINLINE static float Apply(float x) { return !(x <= 0) ? x : 0.0f; }
};  // NaN stays
struct Sigmoid { MX_XINLINE static float Apply(float x) { return 1.0f / (1.0f + expf(-x)); } };
struct Tanh { MX_XINLINE static float Apply(float x) { return tanhf(x); } };
}  // namespace op

// ---- Element-wise kernels.

// out[i] = value.
struct FillKernel {
  struct Params {
    float* out;
    float value;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    float* out = p.out;
    const float v = p.value;
    for (int64_t i = begin; i < end; ++i) out[i] = v;
  }
};

// out[i] = F(a[i], b[i]) for arrays of one shape. out may be a or b.
template <typename F>
struct BinaryKernel {
  struct Params {
    float* out;
    const float* a;
    const float* b;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    float* out = p.out;
    const float* a = p.a;
    const float* b = p.b;
    for (int64_t i = begin; i < end; ++i) out[i] = F::Apply(a[i], b[i]);
  }
};

// out[i] = F(a[i], s). out may be a.
template <typename F>
struct ScalarKernel {
  struct Params {
    float* out;
    const float* a;
    float s;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    float* out = p.out;
    const float* a = p.a;
    const float s = p.s;
    for (int64_t i = begin; i < end; ++i) out[i] = F::Apply(a[i], s);
  }
};

// out[i] = F(a[i]). out may be a.
template <typename F>
struct UnaryKernel {
  struct Params {
    float* out;
    const float* a;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    float* out = p.out;
    const float* a = p.a;
    for (int64_t i = begin; i < end; ++i) out[i] = F::Apply(a[i]);
  }
};

// out[i] = a[i] clipped to [lo, hi].
struct ClipKernel {
  struct Params {
    float* out;
    const float* a;
    float lo, hi;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    float* out = p.out;
    const float* a = p.a;
    const float lo = p.lo, hi = p.hi;
    for (int64_t i = begin; i < end; ++i) {
      const float x = a[i];
      out[i] = x < lo ? lo : (x > hi ? hi : x);
    }
  }
};

// out[i] = alpha * x[i] + beta * y[i].
struct AxpbyKernel {
  struct Params {
    float* out;
    const float* x;
    const float* y;
    float alpha, beta;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    float* out = p.out;
    const float* x = p.x;
    const float* y = p.y;
    const float alpha = p.alpha, beta = p.beta;
    // One explicit fused multiply-add: host and device compilers would
    // otherwise each choose which product to fuse (both fuse when they
    // may), and the CPU and GPU tests compare the bits.
    for (int64_t i = begin; i < end; ++i) out[i] = fmaf(alpha, x[i], beta * y[i]);
  }
};

// ---- Broadcasting (NumPy rules). The one implementation of broadcasting in
// mx: NDArray arithmetic and the broadcast_* operators both use it.

constexpr int kMaxBroadcastDims = 8;

// The output shape and each input's element strides seen through it (0 where
// the input is broadcast along a dimension). ndim >= 1; a 0-d output is
// described as shape (1). Built on the host by MakeBroadcastIndex
// (ndarray/launch.h).
struct BroadcastIndex {
  int ndim;
  int64_t shape[kMaxBroadcastDims];
  int64_t sa[kMaxBroadcastDims];
  int64_t sb[kMaxBroadcastDims];
};

// A position in a broadcast iteration: the coordinates of output element i
// and the offsets of the two inputs' elements that meet there.
struct BroadcastCursor {
  int64_t coord[kMaxBroadcastDims];
  int64_t oa, ob;

  // The cursor at output element i: one division per dimension.
  MX_XINLINE BroadcastCursor(const BroadcastIndex& ix, int64_t i) : oa(0), ob(0) {
    for (int d = ix.ndim - 1; d >= 0; --d) {
      coord[d] = i % ix.shape[d];
      i /= ix.shape[d];
      oa += coord[d] * ix.sa[d];
      ob += coord[d] * ix.sb[d];
    }
  }

  // Elements left in the current run along the last dimension.
  MX_XINLINE int64_t RunLeft(const BroadcastIndex& ix) const {
    return ix.shape[ix.ndim - 1] - coord[ix.ndim - 1];
  }

  // Moves `steps` elements on, at most to the end of the current run,
  // carrying into the outer dimensions like an odometer.
  MX_XINLINE void Advance(const BroadcastIndex& ix, int64_t steps) {
    const int last = ix.ndim - 1;
    coord[last] += steps;
    oa += steps * ix.sa[last];
    ob += steps * ix.sb[last];
    for (int d = last; d > 0 && coord[d] == ix.shape[d]; --d) {
      oa += ix.sa[d - 1] - ix.sa[d] * ix.shape[d];
      ob += ix.sb[d - 1] - ix.sb[d] * ix.shape[d];
      coord[d] = 0;
      ++coord[d - 1];
    }
  }
};

// Calls f(i, offset_a, offset_b) for output elements i in [begin, end), in
// order: the loop of broadcasting code that is not a plain kernel (gradients
// summed back to an input's shape, reductions over axes).
template <typename F>
MX_XINLINE void ForEachBroadcast(const BroadcastIndex& ix, int64_t begin, int64_t end, F&& f) {
  if (begin >= end) return;
  BroadcastCursor c(ix, begin);
  for (int64_t i = begin; i < end; ++i) {
    f(i, c.oa, c.ob);
    c.Advance(ix, 1);
  }
}

// out[i] = F(a[offset_a(i)], b[offset_b(i)]) over the broadcast shape, out
// contiguous. Works in runs along the last dimension, whose input strides
// are 0 or 1, so the CPU loops vectorize.
template <typename F>
struct BroadcastKernel {
  struct Params {
    float* out;
    const float* a;
    const float* b;
    BroadcastIndex index;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    const BroadcastIndex& ix = p.index;
    const int64_t ia = ix.sa[ix.ndim - 1], ib = ix.sb[ix.ndim - 1];
    BroadcastCursor c(ix, begin);
    for (int64_t i = begin; i < end;) {
      int64_t run = c.RunLeft(ix);
      if (run > end - i) run = end - i;
      float* dst = p.out + i;
      const float* pa = p.a + c.oa;
      const float* pb = p.b + c.ob;
      if (ia == 1 && ib == 1) {
        for (int64_t j = 0; j < run; ++j) dst[j] = F::Apply(pa[j], pb[j]);
      } else if (ia == 1) {
        const float vb = pb[0];
        for (int64_t j = 0; j < run; ++j) dst[j] = F::Apply(pa[j], vb);
      } else if (ib == 1) {
        const float va = pa[0];
        for (int64_t j = 0; j < run; ++j) dst[j] = F::Apply(va, pb[j]);
      } else {
        const float v = F::Apply(pa[0], pb[0]);
        for (int64_t j = 0; j < run; ++j) dst[j] = v;
      }
      i += run;
      c.Advance(ix, run);
    }
  }
};

// ---- Reductions over the middle axis of an (outer, n, inner) view.
// Accumulation is in double. An empty axis gives Init() finalized (0 for
// sum and norm, NaN for mean; max and min of nothing are refused on the
// host).

struct SumReducer {
  MX_XINLINE static double Init() { return 0.0; }
  MX_XINLINE static double Reduce(double acc, float x) { return acc + x; }
  MX_XINLINE static double Combine(double a, double b) { return a + b; }
  MX_XINLINE static float Finalize(double acc, int64_t) { return static_cast<float>(acc); }
};
struct MeanReducer : SumReducer {
  MX_XINLINE static float Finalize(double acc, int64_t n) {
    return n > 0 ? static_cast<float>(acc / n) : NAN;
  }
};
struct NormReducer : SumReducer {
  MX_XINLINE static double Reduce(double acc, float x) { return acc + double(x) * x; }
  MX_XINLINE static float Finalize(double acc, int64_t) { return static_cast<float>(sqrt(acc)); }
};
struct MaxReducer {
  MX_XINLINE static double Init() { return -INFINITY; }
  // Sticks at NaN, as MXNet's red::maximum.
  MX_XINLINE static double Reduce(double acc, float x) { return acc >= x || acc != acc ? acc : x; }
  MX_XINLINE static double Combine(double a, double b) { return a >= b || a != a ? a : b; }
  MX_XINLINE static float Finalize(double acc, int64_t) { return static_cast<float>(acc); }
};
struct MinReducer {
  MX_XINLINE static double Init() { return INFINITY; }
  MX_XINLINE static double Reduce(double acc, float x) { return acc <= x || acc != acc ? acc : x; }
  MX_XINLINE static double Combine(double a, double b) { return a <= b || a != a ? a : b; }
  MX_XINLINE static float Finalize(double acc, int64_t) { return static_cast<float>(acc); }
};

// ---- Random numbers: Philox4x32-10 (Salmon et al., "Parallel random
// numbers: as easy as 1, 2, 3", SC'11), a counter-based generator. Element i
// of a sample is a pure function of (seed, i), so the CPU and the GPU, and
// any split of the work among threads, give the same numbers.

struct Philox {
  uint32_t v[4];
};

MX_XINLINE Philox Philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                             uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t{0xD2511F53u} * c0;
    const uint64_t p1 = uint64_t{0xCD9E8D57u} * c2;
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox{{c0, c1, c2, c3}};
}

// The Philox block of element i under seed.
MX_XINLINE Philox PhiloxAt(uint64_t seed, int64_t i) {
  const uint64_t n = static_cast<uint64_t>(i);
  return Philox4x32(uint32_t(n), uint32_t(n >> 32), 0, 0, uint32_t(seed),
                    uint32_t(seed >> 32));
}

// 24 random bits as a float in [0, 1).
MX_XINLINE float UnitFloat(uint32_t bits) {
  return static_cast<float>(bits >> 8) * (1.0f / 16777216.0f);
}

// out[i] = low + (high - low) * u, u uniform in [0, 1).
struct UniformKernel {
  struct Params {
    float* out;
    uint64_t seed;
    float low, high;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    const float scale = p.high - p.low;
    for (int64_t i = begin; i < end; ++i) {
      p.out[i] = p.low + scale * UnitFloat(PhiloxAt(p.seed, i).v[0]);
    }
  }
};

// out[i] = mean + stddev * z, z standard normal (Box-Muller on two uniforms
// of element i's block). The CPU's and the GPU's logf and cosf may differ in
// the last bit, so normal samples agree to about 1e-6 relative, not bitwise.
struct NormalKernel {
  struct Params {
    float* out;
    uint64_t seed;
    float mean, stddev;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    for (int64_t i = begin; i < end; ++i) {
      const Philox r = PhiloxAt(p.seed, i);
      const float u1 = UnitFloat(r.v[0]) + (1.0f / 16777216.0f);  // (0, 1]
      const float u2 = UnitFloat(r.v[1]);
      const float z = sqrtf(-2.0f * logf(u1)) * cosf(6.2831853071795864f * u2);
      p.out[i] = p.mean + p.stddev * z;
    }
  }
};

// ---- GPU entry points. Defined (explicitly instantiated) for the kernels
// and reducers listed in ndarray/kernel_list.inc: by ndarray/cuda/kernels.cu
// in builds with CUDA, by ndarray/no_cuda.cc otherwise (where they report
// that there is no GPU support). Each enqueues its work on gpu(device)'s
// compute stream and returns nullptr, or the launch error's text.

template <typename K>
const char* GpuLaunch(int device, int64_t n, const typename K::Params& params);

template <typename R>
const char* GpuReduce(int device, const float* in, float* out, int64_t outer,
                      int64_t n, int64_t inner, bool add);

}  // namespace mx::kernel

#endif  // MX_NDARRAY_KERNEL_H_
