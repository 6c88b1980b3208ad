// The examples of the NDArray section of the MXNet.jl overview
// (shared/seed/000_d898c8d2559ac2cd.txt), one test each, translated to mx's
// row-major C++. Julia is column-major and slices the last dimension; mx
// slices the first, so the slicing example uses the transposed shape.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ndarray/ndarray.h"

namespace mx {
namespace {

using ::testing::Each;
using ::testing::ElementsAre;
using ::testing::FloatNear;
using ::testing::HasSubstr;
using ::testing::Pointwise;

// The seed's rand(size(a)): deterministic host values in [0, 1).
std::vector<float> HostRand(int64_t n, uint32_t seed) {
  std::vector<float> v(n);
  uint32_t x = seed;
  for (float& f : v) {
    x = x * 1664525u + 1013904223u;
    f = static_cast<float>(x >> 8) / static_cast<float>(1u << 24);
  }
  return v;
}

// julia> x = mx.zeros(2, 3)
TEST(SeedExamples, ZerosPrintsLikeTheOverview) {
  NDArray x = Zeros({2, 3});
  EXPECT_EQ(x.ToString(),
            "2×3 NDArray<float> @ cpu(0):\n"
            "0.0  0.0  0.0\n"
            "0.0  0.0  0.0\n");
}

// julia> y = zeros(eltype(x), size(x)); copy!(y, x)
TEST(SeedExamples, CopyToAHostArray) {
  NDArray x = Zeros({2, 3});
  std::vector<float> y(x.size(), 7.0f);  // not zero, so the copy shows
  x.SyncCopyToCPU(y.data(), y.size());
  EXPECT_THAT(y, ElementsAre(0, 0, 0, 0, 0, 0));
  EXPECT_EQ(x.ToVector(), y);
}

// julia> z = mx.ones(size(x), mx.gpu()); mx.copy!(z, y)
TEST(SeedExamples, OnesOnAGpuAndCopyIntoIt) {
  NDArray x = Zeros({2, 3});
  std::vector<float> y = x.ToVector();
  if (NumGpus() == 0) {
    // No GPU here: a clear error naming the device, not a crash.
    try {
      NDArray z = Ones(x.shape(), gpu());
      FAIL() << "created an array on gpu(0) without a GPU";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), absl::StatusCode::kFailedPrecondition);
      EXPECT_THAT(e.what(), HasSubstr("gpu(0)"));
    }
    return;
  }
  NDArray z = Ones(x.shape(), gpu());
  EXPECT_EQ(z.ToString(),
            "2×3 NDArray<float> @ gpu(0):\n"
            "1.0  1.0  1.0\n"
            "1.0  1.0  1.0\n");
  z.Assign(y);
  EXPECT_THAT(z.ToVector(), Each(0.0f));
}

// mx.empty(2, 3), mx.empty((2, 3), mx.gpu(2)), mx.zeros, mx.ones,
// mx.copy(jl_arr, context)
TEST(SeedExamples, CommonWaysToCreateArrays) {
  NDArray e = Empty({2, 3});
  EXPECT_EQ(e.shape(), Shape({2, 3}));
  if (NumGpus() <= 2) {
    try {
      Empty({2, 3}, gpu(2));
      FAIL() << "created an array on gpu(2)";
    } catch (const Error& err) {
      EXPECT_EQ(err.code(), absl::StatusCode::kFailedPrecondition);
      EXPECT_THAT(err.what(), HasSubstr("gpu(2)"));
    }
  } else {
    EXPECT_EQ(Empty({2, 3}, gpu(2)).context(), gpu(2));
  }
  EXPECT_THAT(Zeros({2, 3}).ToVector(), Each(0.0f));
  EXPECT_THAT(Ones({2, 3}).ToVector(), Each(1.0f));
  // mx.zeros(shape[, context]), mx.ones, mx.empty on another context.
  for (const NDArray& a : {Zeros({2, 3}, cpu(1)), Ones({2, 3}, cpu(1)), Empty({2, 3}, cpu(1))}) {
    EXPECT_EQ(a.context(), cpu(1));
    EXPECT_EQ(a.shape(), Shape({2, 3}));
  }
  EXPECT_THAT(Ones({2, 3}, cpu(1)).ToVector(), Each(1.0f));
  const std::vector<float> jl_arr = {1, 2, 3, 4, 5, 6};
  NDArray c = FromVector(jl_arr, {2, 3}, cpu(1));
  EXPECT_EQ(c.context(), cpu(1));
  EXPECT_EQ(c.ToVector(), jl_arr);
}

// julia> a = mx.ones(2, 3); b = mx.slice(a, 1:2); b[:] = 2; a
TEST(SeedExamples, SliceSharesMemoryWithItsParent) {
  NDArray a = Ones({3, 2});  // Julia's 2x3, row-major
  NDArray b = a.Slice(0, 2);
  EXPECT_EQ(b.ToString(),
            "2×2 NDArray<float> @ cpu(0):\n"
            "1.0  1.0\n"
            "1.0  1.0\n");
  b.Assign(2.0f);
  EXPECT_EQ(a.ToString(),
            "3×2 NDArray<float> @ cpu(0):\n"
            "2.0  2.0\n"
            "2.0  2.0\n"
            "1.0  1.0\n");
}

// julia> mx.srand(42); a = mx.empty(2, 3); a[:] = 0.5
TEST(SeedExamples, SetAllElementsToAScalar) {
  srand(42);
  NDArray a = Empty({2, 3});
  a.Assign(0.5f);
  EXPECT_EQ(a.ToString(),
            "2×3 NDArray<float> @ cpu(0):\n"
            "0.5  0.5  0.5\n"
            "0.5  0.5  0.5\n");
}

// julia> a[:] = rand(size(a))
TEST(SeedExamples, SetContentsFromAHostArray) {
  NDArray a = Empty({2, 3});
  const std::vector<float> r = HostRand(6, 1);
  a.Assign(r);
  EXPECT_EQ(a.ToVector(), r);
}

// julia> copy!(a, rand(size(a)))
TEST(SeedExamples, CopyAHostArrayIn) {
  NDArray a = Zeros({2, 3});
  const std::vector<float> r = HostRand(6, 2);
  a.SyncCopyFromCPU(r.data(), r.size());
  EXPECT_EQ(a.ToVector(), r);
}

// julia> b = mx.empty(size(a)); b[:] = a
TEST(SeedExamples, AssignmentBetweenArraysCopies) {
  NDArray a = FromVector(HostRand(6, 3), {2, 3});
  NDArray b = Empty(a.shape());
  b.Assign(a);
  EXPECT_EQ(b.ToVector(), a.ToVector());
  EXPECT_EQ(b.ToString(), a.ToString());
  EXPECT_FALSE(b.SharesStorageWith(a));
}

// julia> a = mx.ones(2); r = a; b = mx.ones(2); a += b  # a = a + b
TEST(SeedExamples, RebindingLeavesTheOldArrayAlone) {
  NDArray a = Ones({2});
  NDArray r = a;
  NDArray b = Ones({2});
  a = a + b;
  EXPECT_EQ(a.ToString(), "2 NDArray<float> @ cpu(0):\n2.0\n2.0\n");
  EXPECT_EQ(r.ToString(), "2 NDArray<float> @ cpu(0):\n1.0\n1.0\n");
}

// julia> @mx.inplace a += b   (twice)
TEST(SeedExamples, InPlaceAddUpdatesEveryReference) {
  NDArray a = Ones({2});
  NDArray r = a;
  NDArray b = Ones({2});
  a += b;
  a += b;
  EXPECT_EQ(a.ToString(), "2 NDArray<float> @ cpu(0):\n3.0\n3.0\n");
  EXPECT_EQ(r.ToString(), a.ToString());
  a += b;
  EXPECT_THAT(r.ToVector(), ElementsAre(4, 4));
}

// @inplace weight += lr * (grad_scale * grad + self.weight_decay * weight)
TEST(SeedExamples, SgdUpdateMatchesAHostComputation) {
  const int64_t n = 128 * 64;
  const float lr = -0.1f, grad_scale = 0.5f, wd = 0.01f;
  std::vector<float> w = HostRand(n, 4), g = HostRand(n, 5);
  NDArray weight = FromVector(w, {128, 64});
  NDArray grad = FromVector(g, {128, 64});
  NDArray alias = weight;  // in place: every handle sees the update
  for (int step = 0; step < 10; ++step) {
    weight += lr * (grad_scale * grad + wd * weight);
    for (int64_t i = 0; i < n; ++i)
      w[i] += lr * (grad_scale * g[i] + wd * w[i]);
  }
  EXPECT_THAT(weight.ToVector(), Pointwise(FloatNear(1e-6f), w));
  EXPECT_TRUE(alias.SharesStorageWith(weight));
  EXPECT_EQ(alias.ToVector(), weight.ToVector());
}

// The benchmark's two functions: preallocated temporaries vs expressions.
constexpr int kRepeats = 1000;
const Shape kShape = {128, 64};
constexpr float kLr = 0.1f;

NDArray InplaceOp() {
  NDArray weight = Zeros(kShape);
  NDArray grad = Ones(kShape);
  NDArray grad_lr = Empty(kShape);  // preallocated temporary
  for (int i = 0; i < kRepeats; ++i) {
    grad_lr.Assign(grad);  // copy!(grad_lr, grad)
    grad_lr *= kLr;        // @mx.inplace grad_lr .*= LR
    weight.Assign(grad_lr);
  }
  return weight;
}

NDArray NormalOp() {
  NDArray weight = Zeros(kShape);
  NDArray grad = Ones(kShape);
  for (int i = 0; i < kRepeats; ++i) weight.Assign(kLr * grad);
  return weight;
}

TEST(SeedExamples, PreallocatedAndTemporaryVersionsAgree) {
  NDArray normal = NormalOp();
  NDArray inplace = InplaceOp();
  EXPECT_LT(Max(Abs(normal - inplace)).Scalar(), 1e-6f);
  EXPECT_THAT(normal.ToVector(), Each(kLr));
}

}  // namespace
}  // namespace mx
