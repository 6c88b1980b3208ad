// Arithmetic, element-wise functions, reductions, dot and random numbers on
// CPU NDArrays. Every function checks its arguments at once (throwing
// mx::Error) and pushes a kernel to the engine.
#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <random>

#include "absl/strings/str_cat.h"
#include "ndarray/ndarray.h"
#include "ndarray/op_util.h"
#include "ndarray/parallel.h"

namespace mx {

using internal::PushKernel;
using internal::RequireCpu;

namespace {

// ---- Element-wise kernels. Functors are inlined into simple loops that the
// compiler vectorizes.

struct AddF { float operator()(float a, float b) const { return a + b; } };
struct SubF { float operator()(float a, float b) const { return a - b; } };
struct MulF { float operator()(float a, float b) const { return a * b; } };
struct DivF { float operator()(float a, float b) const { return a / b; } };
struct MaxF { float operator()(float a, float b) const { return a > b ? a : b; } };
struct MinF { float operator()(float a, float b) const { return a < b ? a : b; } };
// b op a, for scalar-on-the-left forms.
template <typename F>
struct Swap {
  float operator()(float a, float b) const { return F()(b, a); }
};

// The shape of `a op b` under NumPy broadcasting, or an error naming both.
Shape BroadcastShape(const char* op, const Shape& a, const Shape& b) {
  int nd = std::max(a.ndim(), b.ndim());
  Shape out;
  for (int i = 0; i < nd; ++i) {
    int ia = i - (nd - a.ndim()), ib = i - (nd - b.ndim());
    int64_t da = ia >= 0 ? a[ia] : 1, db = ib >= 0 ? b[ib] : 1;
    MX_THROW_IF_NOT(da == db || da == 1 || db == 1, op,
                    ": shapes ", a.ToString(), " and ", b.ToString(),
                    " cannot be broadcast together");
    out.push_back(da == 1 ? db : da);
  }
  return out;
}

// Element strides of `in` seen through broadcast shape `out` (0 where `in`
// is broadcast).
std::vector<int64_t> BroadcastStrides(const Shape& in, const Shape& out) {
  std::vector<int64_t> strides(out.ndim(), 0);
  int64_t stride = 1;
  for (int i = in.ndim() - 1; i >= 0; --i) {
    int o = i + (out.ndim() - in.ndim());
    strides[o] = in[i] == 1 ? 0 : stride;
    stride *= in[i];
  }
  return strides;
}

// out = f(a, b) over `shape`, a and b read through broadcast strides. The
// last dimension is the inner loop; outer indices advance like an odometer.
template <typename F>
void BroadcastKernel(const float* a, std::vector<int64_t> sa, const float* b,
                     std::vector<int64_t> sb, float* out, const Shape& shape,
                     F f) {
  const int nd = shape.ndim();
  if (shape.Size() == 0) return;
  if (nd == 0) {
    out[0] = f(a[0], b[0]);
    return;
  }
  const int64_t inner = shape[nd - 1];
  const int64_t ia = sa[nd - 1], ib = sb[nd - 1];
  std::vector<int64_t> idx(nd, 0);
  const int64_t outer = shape.Size() / std::max<int64_t>(inner, 1);
  int64_t oa = 0, ob = 0;
  for (int64_t o = 0; o < outer; ++o) {
    float* dst = out + o * inner;
    const float* pa = a + oa;
    const float* pb = b + ob;
    if (ia == 1 && ib == 1) {
      for (int64_t i = 0; i < inner; ++i) dst[i] = f(pa[i], pb[i]);
    } else if (ia == 1) {
      const float vb = pb[0];
      for (int64_t i = 0; i < inner; ++i) dst[i] = f(pa[i], vb);
    } else if (ib == 1) {
      const float va = pa[0];
      for (int64_t i = 0; i < inner; ++i) dst[i] = f(va, pb[i]);
    } else {
      for (int64_t i = 0; i < inner; ++i) dst[i] = f(pa[i * ia], pb[i * ib]);
    }
    for (int d = nd - 2; d >= 0; --d) {
      oa += sa[d];
      ob += sb[d];
      if (++idx[d] < shape[d]) break;
      oa -= sa[d] * shape[d];
      ob -= sb[d] * shape[d];
      idx[d] = 0;
    }
  }
}

template <typename F>
void Binary(const char* name, const NDArray& a, const NDArray& b,
            const NDArray& out) {
  if (a.shape() == b.shape() && out.shape() == a.shape()) {
    const float* pa = a.data();
    const float* pb = b.data();
    float* po = out.data();
    const int64_t n = out.size();
    PushKernel(name, out.context(), {&a, &b}, {&out}, [=] {
      F f;
      for (int64_t i = 0; i < n; ++i) po[i] = f(pa[i], pb[i]);
    });
    return;
  }
  const float* pa = a.data();
  const float* pb = b.data();
  float* po = out.data();
  Shape shape = out.shape();
  std::vector<int64_t> sa = BroadcastStrides(a.shape(), shape);
  std::vector<int64_t> sb = BroadcastStrides(b.shape(), shape);
  PushKernel(name, out.context(), {&a, &b}, {&out}, [=] {
    BroadcastKernel(pa, sa, pb, sb, po, shape, F());
  });
}

template <typename F>
NDArray BinaryNew(const char* name, const NDArray& a, const NDArray& b) {
  RequireCpu(name, {&a, &b});
  NDArray out(BroadcastShape(name, a.shape(), b.shape()), a.context());
  Binary<F>(name, a, b, out);
  return out;
}

template <typename F>
void BinaryInPlace(const char* name, NDArray& a, const NDArray& b) {
  RequireCpu(name, {&a, &b});
  Shape shape = BroadcastShape(name, a.shape(), b.shape());
  MX_THROW_IF_NOT(shape == a.shape(), name, ": the right-hand side ",
                  b.shape().ToString(), " does not broadcast to ",
                  a.shape().ToString());
  // A view that overlaps a elsewhere (a -= a.Slice(0, 1)) would be read after
  // the kernel overwrote it: read a copy instead, as NumPy does.
  const float* pa = a.data();
  const float* pb = b.data();
  const bool overlaps = b.SharesStorageWith(a) && pb < pa + a.size() &&
                        pa < pb + b.size();
  if (overlaps && !(pa == pb && a.shape() == b.shape())) {
    Binary<F>(name, a, b.Copy(), a);
    return;
  }
  Binary<F>(name, a, b, a);
}

// out = f(a[i], s).
template <typename F>
void ScalarOp(const char* name, const NDArray& a, float s, const NDArray& out) {
  RequireCpu(name, {&a});
  const float* pa = a.data();
  float* po = out.data();
  const int64_t n = a.size();
  PushKernel(name, out.context(), {&a}, {&out}, [=] {
    F f;
    for (int64_t i = 0; i < n; ++i) po[i] = f(pa[i], s);
  });
}

template <typename F>
NDArray ScalarNew(const char* name, const NDArray& a, float s) {
  RequireCpu(name, {&a});
  NDArray out(a.shape(), a.context());
  ScalarOp<F>(name, a, s, out);
  return out;
}

template <typename F>
NDArray Unary(const char* name, const NDArray& a, F f) {
  RequireCpu(name, {&a});
  NDArray out(a.shape(), a.context());
  const float* pa = a.data();
  float* po = out.data();
  const int64_t n = a.size();
  PushKernel(name, a.context(), {&a}, {&out}, [=] {
    for (int64_t i = 0; i < n; ++i) po[i] = f(pa[i]);
  });
  return out;
}

}  // namespace

NDArray operator+(const NDArray& a, const NDArray& b) { return BinaryNew<AddF>("add", a, b); }
NDArray operator-(const NDArray& a, const NDArray& b) { return BinaryNew<SubF>("subtract", a, b); }
NDArray operator*(const NDArray& a, const NDArray& b) { return BinaryNew<MulF>("multiply", a, b); }
NDArray operator/(const NDArray& a, const NDArray& b) { return BinaryNew<DivF>("divide", a, b); }
NDArray Maximum(const NDArray& a, const NDArray& b) { return BinaryNew<MaxF>("maximum", a, b); }
NDArray Minimum(const NDArray& a, const NDArray& b) { return BinaryNew<MinF>("minimum", a, b); }

NDArray operator+(const NDArray& a, float s) { return ScalarNew<AddF>("add_scalar", a, s); }
NDArray operator-(const NDArray& a, float s) { return ScalarNew<SubF>("subtract_scalar", a, s); }
NDArray operator*(const NDArray& a, float s) { return ScalarNew<MulF>("multiply_scalar", a, s); }
NDArray operator/(const NDArray& a, float s) { return ScalarNew<DivF>("divide_scalar", a, s); }
NDArray operator+(float s, const NDArray& a) { return ScalarNew<AddF>("add_scalar", a, s); }
NDArray operator-(float s, const NDArray& a) { return ScalarNew<Swap<SubF>>("rsubtract_scalar", a, s); }
NDArray operator*(float s, const NDArray& a) { return ScalarNew<MulF>("multiply_scalar", a, s); }
NDArray operator/(float s, const NDArray& a) { return ScalarNew<Swap<DivF>>("rdivide_scalar", a, s); }
NDArray operator-(const NDArray& a) { return ScalarNew<MulF>("negative", a, -1.0f); }
NDArray Maximum(const NDArray& a, float s) { return ScalarNew<MaxF>("maximum_scalar", a, s); }
NDArray Minimum(const NDArray& a, float s) { return ScalarNew<MinF>("minimum_scalar", a, s); }

NDArray& NDArray::operator+=(const NDArray& b) { BinaryInPlace<AddF>("+=", *this, b); return *this; }
NDArray& NDArray::operator-=(const NDArray& b) { BinaryInPlace<SubF>("-=", *this, b); return *this; }
NDArray& NDArray::operator*=(const NDArray& b) { BinaryInPlace<MulF>("*=", *this, b); return *this; }
NDArray& NDArray::operator/=(const NDArray& b) { BinaryInPlace<DivF>("/=", *this, b); return *this; }
NDArray& NDArray::operator+=(float s) { ScalarOp<AddF>("+=", *this, s, *this); return *this; }
NDArray& NDArray::operator-=(float s) { ScalarOp<SubF>("-=", *this, s, *this); return *this; }
NDArray& NDArray::operator*=(float s) { ScalarOp<MulF>("*=", *this, s, *this); return *this; }
NDArray& NDArray::operator/=(float s) { ScalarOp<DivF>("/=", *this, s, *this); return *this; }

NDArray Axpby(float alpha, const NDArray& x, float beta, const NDArray& y) {
  RequireCpu("Axpby", {&x, &y});
  internal::RequireSameShape("Axpby", x, y);
  NDArray out(x.shape(), x.context());
  const float* px = x.data();
  const float* py = y.data();
  float* po = out.data();
  const int64_t n = x.size();
  PushKernel("Axpby", x.context(), {&x, &y}, {&out}, [=] {
    for (int64_t i = 0; i < n; ++i) po[i] = alpha * px[i] + beta * py[i];
  });
  return out;
}

NDArray Exp(const NDArray& a) { return Unary("exp", a, [](float x) { return std::exp(x); }); }
NDArray Log(const NDArray& a) { return Unary("log", a, [](float x) { return std::log(x); }); }
NDArray Sqrt(const NDArray& a) { return Unary("sqrt", a, [](float x) { return std::sqrt(x); }); }
NDArray Square(const NDArray& a) { return Unary("square", a, [](float x) { return x * x; }); }
NDArray Abs(const NDArray& a) { return Unary("abs", a, [](float x) { return std::fabs(x); }); }
NDArray Sign(const NDArray& a) {
  return Unary("sign", a, [](float x) { return x > 0 ? 1.0f : (x < 0 ? -1.0f : 0.0f); });
}
NDArray Relu(const NDArray& a) { return Unary("relu", a, [](float x) { return x > 0 ? x : 0.0f; }); }
NDArray Sigmoid(const NDArray& a) {
  return Unary("sigmoid", a, [](float x) { return 1.0f / (1.0f + std::exp(-x)); });
}
NDArray Tanh(const NDArray& a) { return Unary("tanh", a, [](float x) { return std::tanh(x); }); }
NDArray Clip(const NDArray& a, float lo, float hi) {
  MX_THROW_IF_NOT(lo <= hi, "Clip: lower bound ", lo, " exceeds upper bound ", hi);
  return Unary("clip", a, [lo, hi](float x) { return x < lo ? lo : (x > hi ? hi : x); });
}

// ---- Reductions. An axis reduction views the input as (outer, n, inner)
// and reduces the middle dimension; the full reduction is the case
// outer = inner = 1.

namespace {

enum class Reducer { kSum, kMean, kMax, kMin, kNorm };

void ReduceKernel(Reducer r, const float* in, float* out, int64_t outer,
                  int64_t n, int64_t inner) {
  const float init = r == Reducer::kMax   ? -std::numeric_limits<float>::infinity()
                     : r == Reducer::kMin ? std::numeric_limits<float>::infinity()
                                          : 0.0f;
  std::vector<double> acc(inner);
  for (int64_t o = 0; o < outer; ++o) {
    std::fill(acc.begin(), acc.end(), init);
    const float* block = in + o * n * inner;
    for (int64_t k = 0; k < n; ++k) {
      const float* row = block + k * inner;
      switch (r) {
        case Reducer::kSum:
        case Reducer::kMean:
          for (int64_t i = 0; i < inner; ++i) acc[i] += row[i];
          break;
        case Reducer::kNorm:
          for (int64_t i = 0; i < inner; ++i) acc[i] += double(row[i]) * row[i];
          break;
        case Reducer::kMax:
          for (int64_t i = 0; i < inner; ++i) acc[i] = std::max<double>(acc[i], row[i]);
          break;
        case Reducer::kMin:
          for (int64_t i = 0; i < inner; ++i) acc[i] = std::min<double>(acc[i], row[i]);
          break;
      }
    }
    for (int64_t i = 0; i < inner; ++i) {
      double v = acc[i];
      if (r == Reducer::kMean) v = n > 0 ? v / n : std::nan("");
      if (r == Reducer::kNorm) v = std::sqrt(v);
      out[o * inner + i] = static_cast<float>(v);
    }
  }
}

NDArray Reduce(const char* name, Reducer r, const NDArray& a, int64_t outer,
               int64_t n, int64_t inner, const Shape& out_shape) {
  RequireCpu(name, {&a});
  MX_THROW_IF_NOT(n > 0 || (r != Reducer::kMax && r != Reducer::kMin), name,
                  ": cannot reduce an empty axis of shape ", a.shape().ToString());
  NDArray out(out_shape, a.context());
  const float* pa = a.data();
  float* po = out.data();
  PushKernel(name, a.context(), {&a}, {&out},
             [=] { ReduceKernel(r, pa, po, outer, n, inner); });
  return out;
}

NDArray ReduceAll(const char* name, Reducer r, const NDArray& a) {
  return Reduce(name, r, a, 1, a.size(), 1, Shape{1});
}

NDArray ReduceAxis(const char* name, Reducer r, const NDArray& a, int axis,
                   bool keepdims) {
  const int nd = a.ndim();
  MX_THROW_IF_NOT(axis >= -nd && axis < nd, name, ": axis ", axis,
                  " is out of range for shape ", a.shape().ToString());
  if (axis < 0) axis += nd;
  int64_t outer = 1, inner = 1;
  Shape out_shape;
  for (int i = 0; i < nd; ++i) {
    if (i < axis) outer *= a.shape()[i];
    if (i > axis) inner *= a.shape()[i];
    if (i != axis) {
      out_shape.push_back(a.shape()[i]);
    } else if (keepdims) {
      out_shape.push_back(1);
    }
  }
  return Reduce(name, r, a, outer, a.shape()[axis], inner, out_shape);
}

}  // namespace

NDArray Sum(const NDArray& a) { return ReduceAll("sum", Reducer::kSum, a); }
NDArray Mean(const NDArray& a) { return ReduceAll("mean", Reducer::kMean, a); }
NDArray Max(const NDArray& a) { return ReduceAll("max", Reducer::kMax, a); }
NDArray Min(const NDArray& a) { return ReduceAll("min", Reducer::kMin, a); }
NDArray Norm(const NDArray& a) { return ReduceAll("norm", Reducer::kNorm, a); }
NDArray Sum(const NDArray& a, int axis, bool keepdims) { return ReduceAxis("sum", Reducer::kSum, a, axis, keepdims); }
NDArray Mean(const NDArray& a, int axis, bool keepdims) { return ReduceAxis("mean", Reducer::kMean, a, axis, keepdims); }
NDArray Max(const NDArray& a, int axis, bool keepdims) { return ReduceAxis("max", Reducer::kMax, a, axis, keepdims); }
NDArray Min(const NDArray& a, int axis, bool keepdims) { return ReduceAxis("min", Reducer::kMin, a, axis, keepdims); }
NDArray Norm(const NDArray& a, int axis, bool keepdims) { return ReduceAxis("norm", Reducer::kNorm, a, axis, keepdims); }

// ---- Dot. OpenBLAS parallelizes one sgemm over its own threads, so a
// product runs as a single engine operation and OpenBLAS owns the cores for
// its duration.

NDArray Dot(const NDArray& a, const NDArray& b, bool transpose_a,
            bool transpose_b) {
  RequireCpu("dot", {&a, &b});
  MX_THROW_IF_NOT(a.ndim() == 2 && b.ndim() == 2,
                  "dot: both arguments must be 2-D, got ", a.shape().ToString(),
                  " and ", b.shape().ToString());
  const int64_t m = transpose_a ? a.shape()[1] : a.shape()[0];
  const int64_t k = transpose_a ? a.shape()[0] : a.shape()[1];
  const int64_t kb = transpose_b ? b.shape()[1] : b.shape()[0];
  const int64_t n = transpose_b ? b.shape()[0] : b.shape()[1];
  MX_THROW_IF_NOT(k == kb, "dot: inner dimensions differ: ",
                  a.shape().ToString(), transpose_a ? "ᵀ" : "", " x ",
                  b.shape().ToString(), transpose_b ? "ᵀ" : "");
  NDArray out(Shape{m, n}, a.context());
  const float* pa = a.data();
  const float* pb = b.data();
  float* po = out.data();
  const int64_t lda = a.shape()[1], ldb = b.shape()[1];
  PushKernel("dot", a.context(), {&a, &b}, {&out}, [=] {
    if (m == 0 || n == 0) return;
    if (k == 0) {
      std::fill(po, po + m * n, 0.0f);
      return;
    }
    Sgemm(transpose_a, transpose_b, m, n, k, 1.0f, pa, lda, pb, ldb, 0.0f, po, n);
  }, 0, FnProperty::kCpuParallel);
  return out;
}

// ---- Random numbers.

namespace {

std::mutex& SeedMutex() {
  static std::mutex mu;
  return mu;
}

std::mt19937_64& SeedSource() {
  static std::mt19937_64 gen(std::random_device{}());
  return gen;
}


template <typename Dist>
void Sample(const char* name, Dist dist, NDArray* out) {
  RequireCpu(name, {out});
  float* po = out->data();
  const int64_t n = out->size();
  const uint64_t seed = NextRandomSeed();
  PushKernel(name, out->context(), {}, {out}, [=]() mutable {
    std::mt19937 gen(static_cast<std::mt19937::result_type>(seed));
    for (int64_t i = 0; i < n; ++i) po[i] = dist(gen);
  });
}

}  // namespace

uint64_t NextRandomSeed() {
  std::lock_guard<std::mutex> lock(SeedMutex());
  return SeedSource()();
}

void srand(uint64_t seed) {
  std::lock_guard<std::mutex> lock(SeedMutex());
  SeedSource().seed(seed);
}

void SampleUniform(float low, float high, NDArray* out) {
  MX_THROW_IF_NOT(low <= high, "SampleUniform: low ", low, " exceeds high ", high);
  Sample("uniform", std::uniform_real_distribution<float>(low, high), out);
}

void SampleNormal(float mean, float stddev, NDArray* out) {
  MX_THROW_IF_NOT(stddev >= 0, "SampleNormal: negative stddev ", stddev);
  Sample("normal", std::normal_distribution<float>(mean, stddev), out);
}

NDArray RandomUniform(float low, float high, const Shape& shape, Context ctx) {
  NDArray out(shape, ctx);
  SampleUniform(low, high, &out);
  return out;
}

NDArray RandomNormal(float mean, float stddev, const Shape& shape, Context ctx) {
  NDArray out(shape, ctx);
  SampleNormal(mean, stddev, &out);
  return out;
}

}  // namespace mx
