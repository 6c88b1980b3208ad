// Arithmetic, element-wise functions, reductions, dot and random numbers on
// NDArrays of any context. Every function checks its arguments at once
// (throwing mx::Error) and pushes a kernel of ndarray/kernel.h to the engine.
#include <mutex>
#include <random>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "ndarray/ndarray.h"
#include "ndarray/launch.h"
#include "ndarray/op_util.h"

namespace mx {

using internal::PushKernel;
using internal::RequireSameContext;
using kernel::Launch;
namespace op = kernel::op;

namespace {

// ---- Element-wise operations, on any context, through ndarray/kernel.h.

template <typename F>
void Binary(const char* name, const NDArray& a, const NDArray& b, const NDArray& out) {
  const Context ctx = out.context();
  const int64_t n = out.size();
  if (a.shape() == b.shape() && out.shape() == a.shape()) {
    const typename kernel::BinaryKernel<F>::Params p{out.data(), a.data(), b.data()};
    PushKernel(name, ctx, {&a, &b}, {&out},
               [=] { Launch<kernel::BinaryKernel<F>>(name, ctx, n, p); });
    return;
  }
  const typename kernel::BroadcastKernel<F>::Params p{
      out.data(), a.data(), b.data(),
      kernel::MakeBroadcastIndex(name, out.shape(), a.shape(), b.shape())};
  PushKernel(name, ctx, {&a, &b}, {&out},
             [=] { Launch<kernel::BroadcastKernel<F>>(name, ctx, n, p); });
}

template <typename F>
NDArray BinaryNew(const char* name, const NDArray& a, const NDArray& b) {
  RequireSameContext(name, {&a, &b});
  NDArray out(kernel::BroadcastShape(name, a.shape(), b.shape()), a.context());
  Binary<F>(name, a, b, out);
  return out;
}

template <typename F>
void BinaryInPlace(const char* name, NDArray& a, const NDArray& b) {
  RequireSameContext(name, {&a, &b});
  Shape shape = kernel::BroadcastShape(name, a.shape(), b.shape());
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

// out = F(a[i], s).
template <typename F>
void ScalarOp(const char* name, const NDArray& a, float s, const NDArray& out) {
  RequireSameContext(name, {&a, &out});
  const Context ctx = a.context();
  const int64_t n = a.size();
  const typename kernel::ScalarKernel<F>::Params p{out.data(), a.data(), s};
  PushKernel(name, ctx, {&a}, {&out},
             [=] { Launch<kernel::ScalarKernel<F>>(name, ctx, n, p); });
}

template <typename F>
NDArray ScalarNew(const char* name, const NDArray& a, float s) {
  RequireSameContext(name, {&a});
  NDArray out(a.shape(), a.context());
  ScalarOp<F>(name, a, s, out);
  return out;
}

// A new array of a's shape and context written by kernel K with params p,
// where p's first member is the output.
template <typename K>
NDArray MapNew(const char* name, const NDArray& a, typename K::Params p,
               std::initializer_list<const NDArray*> reads) {
  NDArray out(a.shape(), a.context());
  p.out = out.data();
  const Context ctx = a.context();
  const int64_t n = a.size();
  PushKernel(name, ctx, reads, {&out}, [=] { Launch<K>(name, ctx, n, p); });
  return out;
}

template <typename F>
NDArray Unary(const char* name, const NDArray& a) {
  RequireSameContext(name, {&a});
  return MapNew<kernel::UnaryKernel<F>>(name, a, {nullptr, a.data()}, {&a});
}

}  // namespace

NDArray operator+(const NDArray& a, const NDArray& b) { return BinaryNew<op::Add>("add", a, b); }
NDArray operator-(const NDArray& a, const NDArray& b) { return BinaryNew<op::Sub>("subtract", a, b); }
NDArray operator*(const NDArray& a, const NDArray& b) { return BinaryNew<op::Mul>("multiply", a, b); }
NDArray operator/(const NDArray& a, const NDArray& b) { return BinaryNew<op::Div>("divide", a, b); }
NDArray Maximum(const NDArray& a, const NDArray& b) { return BinaryNew<op::Max>("maximum", a, b); }
NDArray Minimum(const NDArray& a, const NDArray& b) { return BinaryNew<op::Min>("minimum", a, b); }

NDArray operator+(const NDArray& a, float s) { return ScalarNew<op::Add>("add_scalar", a, s); }
NDArray operator-(const NDArray& a, float s) { return ScalarNew<op::Sub>("subtract_scalar", a, s); }
NDArray operator*(const NDArray& a, float s) { return ScalarNew<op::Mul>("multiply_scalar", a, s); }
NDArray operator/(const NDArray& a, float s) { return ScalarNew<op::Div>("divide_scalar", a, s); }
NDArray operator+(float s, const NDArray& a) { return ScalarNew<op::Add>("add_scalar", a, s); }
NDArray operator-(float s, const NDArray& a) { return ScalarNew<op::RSub>("rsubtract_scalar", a, s); }
NDArray operator*(float s, const NDArray& a) { return ScalarNew<op::Mul>("multiply_scalar", a, s); }
NDArray operator/(float s, const NDArray& a) { return ScalarNew<op::RDiv>("rdivide_scalar", a, s); }
NDArray operator-(const NDArray& a) { return ScalarNew<op::Mul>("negative", a, -1.0f); }
NDArray Maximum(const NDArray& a, float s) { return ScalarNew<op::Max>("maximum_scalar", a, s); }
NDArray Minimum(const NDArray& a, float s) { return ScalarNew<op::Min>("minimum_scalar", a, s); }

NDArray& NDArray::operator+=(const NDArray& b) { BinaryInPlace<op::Add>("+=", *this, b); return *this; }
NDArray& NDArray::operator-=(const NDArray& b) { BinaryInPlace<op::Sub>("-=", *this, b); return *this; }
NDArray& NDArray::operator*=(const NDArray& b) { BinaryInPlace<op::Mul>("*=", *this, b); return *this; }
NDArray& NDArray::operator/=(const NDArray& b) { BinaryInPlace<op::Div>("/=", *this, b); return *this; }
NDArray& NDArray::operator+=(float s) { ScalarOp<op::Add>("+=", *this, s, *this); return *this; }
NDArray& NDArray::operator-=(float s) { ScalarOp<op::Sub>("-=", *this, s, *this); return *this; }
NDArray& NDArray::operator*=(float s) { ScalarOp<op::Mul>("*=", *this, s, *this); return *this; }
NDArray& NDArray::operator/=(float s) { ScalarOp<op::Div>("/=", *this, s, *this); return *this; }

NDArray Axpby(float alpha, const NDArray& x, float beta, const NDArray& y) {
  RequireSameContext("Axpby", {&x, &y});
  internal::RequireSameShape("Axpby", x, y);
  return MapNew<kernel::AxpbyKernel>("Axpby", x, {nullptr, x.data(), y.data(), alpha, beta},
                                     {&x, &y});
}

NDArray Exp(const NDArray& a) { return Unary<op::Exp>("exp", a); }
NDArray Log(const NDArray& a) { return Unary<op::Log>("log", a); }
NDArray Sqrt(const NDArray& a) { return Unary<op::Sqrt>("sqrt", a); }
NDArray Square(const NDArray& a) { return Unary<op::Square>("square", a); }
NDArray Abs(const NDArray& a) { return Unary<op::Abs>("abs", a); }
NDArray Sign(const NDArray& a) { return Unary<op::Sign>("sign", a); }
NDArray Relu(const NDArray& a) { return Unary<op::Relu>("relu", a); }
NDArray Sigmoid(const NDArray& a) { return Unary<op::Sigmoid>("sigmoid", a); }
NDArray Tanh(const NDArray& a) { return Unary<op::Tanh>("tanh", a); }
NDArray Clip(const NDArray& a, float lo, float hi) {
  MX_THROW_IF_NOT(lo <= hi, "Clip: lower bound ", lo, " exceeds upper bound ", hi);
  RequireSameContext("clip", {&a});
  return MapNew<kernel::ClipKernel>("clip", a, {nullptr, a.data(), lo, hi}, {&a});
}

// ---- Reductions. An axis reduction views the input as (outer, n, inner)
// and reduces the middle dimension; the full reduction is the case
// outer = inner = 1.

namespace {

template <typename R>
NDArray Reduce(const char* name, const NDArray& a, int64_t outer, int64_t n,
               int64_t inner, const Shape& out_shape) {
  RequireSameContext(name, {&a});
  constexpr bool kNeedsElements =
      std::is_same_v<R, kernel::MaxReducer> || std::is_same_v<R, kernel::MinReducer>;
  MX_THROW_IF_NOT(n > 0 || !kNeedsElements, name,
                  ": cannot reduce an empty axis of shape ", a.shape().ToString());
  NDArray out(out_shape, a.context());
  const float* pa = a.data();
  float* po = out.data();
  const Context ctx = a.context();
  PushKernel(name, ctx, {&a}, {&out},
             [=] { kernel::Reduce<R>(name, ctx, pa, po, outer, n, inner); });
  return out;
}

template <typename R>
NDArray ReduceAll(const char* name, const NDArray& a) {
  return Reduce<R>(name, a, 1, a.size(), 1, Shape{1});
}

template <typename R>
NDArray ReduceAxis(const char* name, const NDArray& a, int axis, bool keepdims) {
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
  return Reduce<R>(name, a, outer, a.shape()[axis], inner, out_shape);
}

}  // namespace

using kernel::MaxReducer;
using kernel::MeanReducer;
using kernel::MinReducer;
using kernel::NormReducer;
using kernel::SumReducer;

NDArray Sum(const NDArray& a) { return ReduceAll<SumReducer>("sum", a); }
NDArray Mean(const NDArray& a) { return ReduceAll<MeanReducer>("mean", a); }
NDArray Max(const NDArray& a) { return ReduceAll<MaxReducer>("max", a); }
NDArray Min(const NDArray& a) { return ReduceAll<MinReducer>("min", a); }
NDArray Norm(const NDArray& a) { return ReduceAll<NormReducer>("norm", a); }
NDArray Sum(const NDArray& a, int axis, bool keepdims) { return ReduceAxis<SumReducer>("sum", a, axis, keepdims); }
NDArray Mean(const NDArray& a, int axis, bool keepdims) { return ReduceAxis<MeanReducer>("mean", a, axis, keepdims); }
NDArray Max(const NDArray& a, int axis, bool keepdims) { return ReduceAxis<MaxReducer>("max", a, axis, keepdims); }
NDArray Min(const NDArray& a, int axis, bool keepdims) { return ReduceAxis<MinReducer>("min", a, axis, keepdims); }
NDArray Norm(const NDArray& a, int axis, bool keepdims) { return ReduceAxis<NormReducer>("norm", a, axis, keepdims); }

// ---- Dot. On the CPU, Sgemm parallelizes one product over the pool
// (ndarray/parallel.h), so a product runs as a single engine operation that
// owns the cores for its duration; on a GPU, cuBLAS on the compute stream.

NDArray Dot(const NDArray& a, const NDArray& b, bool transpose_a,
            bool transpose_b) {
  RequireSameContext("dot", {&a, &b});
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
  const Context ctx = a.context();
  NDArray out(Shape{m, n}, ctx);
  const float* pa = a.data();
  const float* pb = b.data();
  float* po = out.data();
  const int64_t lda = a.shape()[1], ldb = b.shape()[1];
  PushKernel("dot", ctx, {&a, &b}, {&out}, [=] {
    kernel::Gemm("dot", ctx, transpose_a, transpose_b, m, n, k, 1.0f, pa, lda, pb, ldb, 0.0f, po);
  }, 0, ctx.is_gpu() ? FnProperty::kNormal : FnProperty::kCpuParallel);
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


// Fills *out with kernel K (UniformKernel or NormalKernel) under the next
// seed: element i depends on (seed, i) alone, so any context gives the same
// numbers (ndarray/kernel.h).
template <typename K>
void Sample(const char* name, float a, float b, NDArray* out) {
  RequireSameContext(name, {out});
  const Context ctx = out->context();
  const int64_t n = out->size();
  const typename K::Params p{out->data(), NextRandomSeed(), a, b};
  PushKernel(name, ctx, {}, {out}, [=] { Launch<K>(name, ctx, n, p); });
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
  Sample<kernel::UniformKernel>("uniform", low, high, out);
}

void SampleNormal(float mean, float stddev, NDArray* out) {
  MX_THROW_IF_NOT(stddev >= 0, "SampleNormal: negative stddev ", stddev);
  Sample<kernel::NormalKernel>("normal", mean, stddev, out);
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
