// Tests of NDArray (ndarray/ndarray.h): creation, contents, views, handle
// semantics, arithmetic with broadcasting, Dot, element-wise functions,
// reductions, random numbers, printing and argument errors. Arrays use the
// process-wide engine, so the whole file also runs under
// MX_ENGINE_TYPE=NaiveEngine.
#include "ndarray/ndarray.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ndarray/storage.h"
#include "tests/ndarray/random_values.h"

namespace mx {
namespace {

using ::testing::Each;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::FloatEq;
using ::testing::FloatNear;
using ::testing::HasSubstr;
using ::testing::Pointwise;

// The status of the mx::Error thrown by f, or OK when it throws nothing.
absl::Status StatusOf(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.status();
  }
  return absl::OkStatus();
}

// Expects f to throw mx::Error with `code` and a message containing every
// string of `parts`.
void ExpectError(const std::function<void()>& f, absl::StatusCode code,
                 const std::vector<std::string>& parts) {
  absl::Status s = StatusOf(f);
  EXPECT_EQ(s.code(), code) << s;
  for (const std::string& part : parts) {
    EXPECT_THAT(std::string(s.message()), HasSubstr(part));
  }
}

std::vector<float> Iota(int64_t n, float start = 0) {
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = start + static_cast<float>(i);
  return v;
}

// ---- Creation.

TEST(NDArrayCreate, EmptyHasTheShapeSizeRankAndContext) {
  NDArray a = Empty({2, 3});
  EXPECT_FALSE(a.is_none());
  EXPECT_EQ(a.shape(), Shape({2, 3}));
  EXPECT_EQ(a.size(), 6);
  EXPECT_EQ(a.ndim(), 2);
  EXPECT_EQ(a.context(), cpu(0));
  EXPECT_NE(a.data(), nullptr);
  EXPECT_NE(a.var(), nullptr);
}

TEST(NDArrayCreate, ZerosOnesAndFullFillEveryElement) {
  EXPECT_THAT(Zeros({2, 3}).ToVector(), ElementsAre(0, 0, 0, 0, 0, 0));
  EXPECT_THAT(Ones({4}).ToVector(), ElementsAre(1, 1, 1, 1));
  EXPECT_THAT(Full({3, 1}, -2.5f).ToVector(), ElementsAre(-2.5, -2.5, -2.5));
  EXPECT_THAT(Ones({2, 3, 4}).ToVector(), ::testing::SizeIs(24));
  EXPECT_THAT(Ones({2, 3, 4}).ToVector(), Each(1.0f));
}

TEST(NDArrayCreate, FromVectorKeepsRowMajorOrder) {
  NDArray a = FromVector({1, 2, 3, 4, 5, 6}, {2, 3});
  EXPECT_EQ(a.shape(), Shape({2, 3}));
  EXPECT_THAT(a.ToVector(), ElementsAre(1, 2, 3, 4, 5, 6));
  EXPECT_THAT(a.At(1).ToVector(), ElementsAre(4, 5, 6));
}

TEST(NDArrayCreate, FromVectorWithoutShapeIsOneDimensional) {
  NDArray a = FromVector({7, 8, 9});
  EXPECT_EQ(a.shape(), Shape({3}));
  EXPECT_EQ(a.ndim(), 1);
  EXPECT_THAT(a.ToVector(), ElementsAre(7, 8, 9));
}

TEST(NDArrayCreate, FromVectorOfTheWrongSizeNamesBothSizes) {
  ExpectError(
      [] {
        FromVector({1, 2, 3, 4, 5}, {2, 3});
      },
      absl::StatusCode::kInvalidArgument, {"5 elements", "(2,3)", "needs 6"});
}

TEST(NDArrayCreate, NegativeDimensionIsInvalidArgument) {
  ExpectError(
      [] {
        Empty({2, -1});
      },
      absl::StatusCode::kInvalidArgument, {"(2,-1)"});
}

TEST(NDArrayCreate, ShapeTooLargeToAddressIsInvalidArgument) {
  // 2^62 floats are 2^64 bytes: the byte count must not wrap around to a
  // small allocation.
  ExpectError([] { Empty({int64_t{1} << 62}); },
              absl::StatusCode::kInvalidArgument, {"(4611686018427387904,)"});
  ExpectError(
      [] {
        Zeros({int64_t{1} << 32, int64_t{1} << 32});
      },
      absl::StatusCode::kInvalidArgument, {"(4294967296,4294967296)"});
  // A zero dimension makes any shape empty.
  EXPECT_EQ(Empty({0, int64_t{1} << 62}).size(), 0);
}

TEST(NDArrayCreate, ZeroSizeArrayIsValid) {
  NDArray a = Zeros({0, 3});
  EXPECT_EQ(a.size(), 0);
  EXPECT_EQ(a.shape(), Shape({0, 3}));
  EXPECT_TRUE(a.ToVector().empty());
  EXPECT_EQ((a + 1.0f).shape(), Shape({0, 3}));
}

TEST(NDArrayCreate, ZeroDimensionalArrayHoldsOneValue) {
  NDArray a = FromVector({5}, Shape{});
  EXPECT_EQ(a.ndim(), 0);
  EXPECT_EQ(a.size(), 1);
  EXPECT_EQ(a.Scalar(), 5.0f);
}

TEST(NDArrayCreate, CpuContextIdIsKept) {
  NDArray a = Ones({2}, cpu(2));
  EXPECT_EQ(a.context(), cpu(2));
  EXPECT_THAT(a.ToVector(), ElementsAre(1, 1));
}

TEST(NDArrayCreate, MissingGpuIsFailedPreconditionNamingIt) {
  if (NumGpus() > 0) GTEST_SKIP() << "this machine has a GPU";
  ExpectError(
      [] {
        Zeros({2, 3}, gpu(0));
      },
      absl::StatusCode::kFailedPrecondition, {"gpu(0)"});
}

TEST(NDArrayCreate, DefaultConstructedArrayIsNullAndRejectedByOperations) {
  NDArray a;
  EXPECT_TRUE(a.is_none());
  EXPECT_EQ(a.data(), nullptr);
  EXPECT_EQ(a.ToString(), "NDArray<float> (null)");
  ExpectError([&] { a.ToVector(); }, absl::StatusCode::kInvalidArgument,
              {"null"});
  ExpectError([&] { a.Assign(1.0f); }, absl::StatusCode::kInvalidArgument,
              {"null"});
  ExpectError([&] { Exp(a); }, absl::StatusCode::kInvalidArgument, {"null"});
  ExpectError([&] { a.Slice(0, 1); }, absl::StatusCode::kInvalidArgument,
              {"null"});
  a.WaitToRead();  // a no-op, not an error
}

// ---- Contents: Assign, Copy, ToVector.

TEST(NDArrayAssign, ScalarSetsEveryElementAndReturnsTheArray) {
  NDArray a = Empty({2, 2});
  NDArray& same = a.Assign(0.5f);
  EXPECT_EQ(&same, &a);
  EXPECT_THAT(a.ToVector(), Each(0.5f));
}

TEST(NDArrayAssign, HostVectorIsCopiedInRowMajorOrder) {
  NDArray a = Zeros({2, 3});
  a.Assign(std::vector<float>{1, 2, 3, 4, 5, 6});
  EXPECT_THAT(a.ToVector(), ElementsAre(1, 2, 3, 4, 5, 6));
}

TEST(NDArrayAssign, HostVectorOfTheWrongSizeNamesBothSizes) {
  NDArray a = Zeros({2, 3});
  ExpectError(
      [&] {
        a.Assign(std::vector<float>{1, 2, 3, 4, 5});
      },
      absl::StatusCode::kInvalidArgument, {"5 elements", "(2,3)", "6"});
  EXPECT_THAT(a.ToVector(), Each(0.0f));  // unchanged
}

TEST(NDArrayAssign, HostVectorWaitsForPendingReaders) {
  NDArray a = Ones({1000});
  NDArray b = a * 2.0f;  // reads a, perhaps later
  a.Assign(std::vector<float>(1000, 5.0f));
  EXPECT_THAT(b.ToVector(), Each(2.0f));
  EXPECT_THAT(a.ToVector(), Each(5.0f));
}

TEST(NDArrayAssign, AnotherArrayCopiesItsContentsNotItsStorage) {
  NDArray src = FromVector({1, 2, 3, 4}, {2, 2});
  NDArray dst = Zeros({2, 2});
  dst.Assign(src);
  src.Assign(9.0f);
  EXPECT_THAT(dst.ToVector(), ElementsAre(1, 2, 3, 4));
  EXPECT_FALSE(dst.SharesStorageWith(src));
}

TEST(NDArrayAssign, ArrayOfAnotherShapeNamesBothShapes) {
  NDArray dst = Zeros({2, 3});
  ExpectError(
      [&] {
        dst.Assign(Zeros({3, 2}));
      },
      absl::StatusCode::kInvalidArgument, {"(2,3)", "(3,2)"});
}

TEST(NDArrayAssign, CopiesBetweenCpuContexts) {
  NDArray src = FromVector({1, 2, 3}, cpu(0));
  NDArray dst = Zeros({3}, cpu(1));
  dst.Assign(src);
  EXPECT_THAT(dst.ToVector(), ElementsAre(1, 2, 3));
  EXPECT_EQ(dst.context(), cpu(1));
}

TEST(NDArrayAssign, ToItselfLeavesValuesUnchanged) {
  NDArray a = FromVector({1, 2, 3});
  a.Assign(a);
  EXPECT_THAT(a.ToVector(), ElementsAre(1, 2, 3));
}

TEST(NDArrayAssign, BetweenOverlappingSlicesBehavesAsACopy) {
  NDArray a = FromVector(Iota(8), {4, 2});
  a.Slice(0, 3).Assign(a.Slice(1, 4));  // shift rows up by one
  EXPECT_THAT(a.ToVector(), ElementsAre(2, 3, 4, 5, 6, 7, 6, 7));
  NDArray b = FromVector(Iota(8), {4, 2});
  b.Slice(1, 4).Assign(b.Slice(0, 3));  // and down
  EXPECT_THAT(b.ToVector(), ElementsAre(0, 1, 0, 1, 2, 3, 4, 5));
}

TEST(NDArrayCopy, MakesIndependentStorageWithTheSameValues) {
  NDArray a = FromVector({1, 2, 3, 4}, {2, 2});
  NDArray b = a.Copy();
  EXPECT_FALSE(b.SharesStorageWith(a));
  EXPECT_EQ(b.shape(), a.shape());
  EXPECT_EQ(b.context(), a.context());
  b.Assign(0.0f);
  EXPECT_THAT(a.ToVector(), ElementsAre(1, 2, 3, 4));
  EXPECT_THAT(b.ToVector(), Each(0.0f));
}

TEST(NDArrayCopy, ToAnotherContext) {
  NDArray a = FromVector({1, 2});
  NDArray b = a.Copy(cpu(3));
  EXPECT_EQ(b.context(), cpu(3));
  EXPECT_THAT(b.ToVector(), ElementsAre(1, 2));
}

TEST(NDArrayCopy, OfASliceCopiesOnlyTheSlice) {
  NDArray a = FromVector(Iota(6), {3, 2});
  NDArray b = a.Slice(1, 2).Copy();
  EXPECT_EQ(b.shape(), Shape({1, 2}));
  EXPECT_THAT(b.ToVector(), ElementsAre(2, 3));
}

TEST(NDArrayHandle, CopyingTheHandleSharesStorage) {
  NDArray a = Zeros({2, 2});
  NDArray b = a;  // the seed's `r = a`
  EXPECT_TRUE(b.SharesStorageWith(a));
  b.Assign(5.0f);
  EXPECT_THAT(a.ToVector(), Each(5.0f));
}

TEST(NDArrayHandle, SyncCopyToCpuWithTheWrongBufferSizeNamesBothSizes) {
  NDArray a = Zeros({2, 3});
  std::vector<float> buf(5);
  ExpectError([&] { a.SyncCopyToCPU(buf.data(), buf.size()); },
              absl::StatusCode::kInvalidArgument,
              {"5 elements", "(2,3)", "has 6"});
}

TEST(NDArrayHandle, SyncCopyFromCpuWithTheWrongSizeNamesBothSizes) {
  NDArray a = Zeros({2, 3});
  std::vector<float> buf(7, 1.0f);
  ExpectError([&] { a.SyncCopyFromCPU(buf.data(), buf.size()); },
              absl::StatusCode::kInvalidArgument, {"7 elements", "(2,3)"});
}

TEST(NDArrayHandle, ScalarOfASizeOneArray) {
  EXPECT_EQ(Full({1, 1}, 3.5f).Scalar(), 3.5f);
  EXPECT_EQ(Sum(Ones({4, 5})).Scalar(), 20.0f);
}

TEST(NDArrayHandle, ScalarOfALargerArrayNamesTheShape) {
  ExpectError([] { Ones({2}).Scalar(); }, absl::StatusCode::kInvalidArgument,
              {"(2,)", "2 elements"});
}

// ---- Views: Slice, At, Reshape.

TEST(NDArraySlice, AssignToSliceChangesParent) {
  // The seed's b = slice(a, 1:2); b[:] = 2, in row-major form.
  NDArray a = Ones({3, 2});
  NDArray b = a.Slice(0, 2);
  EXPECT_EQ(b.shape(), Shape({2, 2}));
  EXPECT_TRUE(b.SharesStorageWith(a));
  b.Assign(2.0f);
  EXPECT_THAT(a.ToVector(), ElementsAre(2, 2, 2, 2, 1, 1));
}

TEST(NDArraySlice, ReadsTheSelectedRows) {
  NDArray a = FromVector(Iota(12), {4, 3});
  EXPECT_THAT(a.Slice(1, 3).ToVector(), ElementsAre(3, 4, 5, 6, 7, 8));
  EXPECT_THAT(a.Slice(3, 4).ToVector(), ElementsAre(9, 10, 11));
  EXPECT_THAT(a.Slice(0, 4).ToVector(), ElementsAreArray(Iota(12)));
}

TEST(NDArraySlice, SliceOfASliceComposesOffsets) {
  NDArray a = FromVector(Iota(10), {10});
  NDArray b = a.Slice(2, 8).Slice(1, 3);
  EXPECT_THAT(b.ToVector(), ElementsAre(3, 4));
  b.Assign(-1.0f);
  EXPECT_THAT(a.ToVector(), ElementsAre(0, 1, 2, -1, -1, 5, 6, 7, 8, 9));
}

TEST(NDArraySlice, EmptyRangeGivesAZeroRowView) {
  NDArray a = Ones({3, 4});
  NDArray e = a.Slice(1, 1);
  EXPECT_EQ(e.shape(), Shape({0, 4}));
  EXPECT_TRUE(e.ToVector().empty());
}

TEST(NDArraySlice, InPlaceArithmeticOnASliceTouchesOnlyIt) {
  NDArray a = Zeros({3, 2});
  NDArray mid = a.Slice(1, 2);
  mid += 10.0f;
  mid *= FromVector({1, 2}, {1, 2});
  EXPECT_THAT(a.ToVector(), ElementsAre(0, 0, 10, 20, 0, 0));
}

TEST(NDArraySlice, OutOfRangeNamesTheRangeAndShape) {
  NDArray a = Ones({3, 2});
  ExpectError([&] { a.Slice(2, 5); }, absl::StatusCode::kInvalidArgument,
              {"[2, 5)", "(3,2)"});
  ExpectError([&] { a.Slice(-1, 1); }, absl::StatusCode::kInvalidArgument,
              {"[-1, 1)", "(3,2)"});
  ExpectError([&] { a.Slice(2, 1); }, absl::StatusCode::kInvalidArgument,
              {"[2, 1)", "(3,2)"});
}

TEST(NDArraySlice, ZeroDimensionalArrayCannotBeSliced) {
  NDArray s = FromVector({1}, Shape{});
  ExpectError([&] { s.Slice(0, 1); }, absl::StatusCode::kInvalidArgument,
              {"0-d"});
}

TEST(NDArrayAt, SelectsOneRowWithOneDimensionFewer) {
  NDArray a = FromVector(Iota(6), {3, 2});
  NDArray row = a.At(1);
  EXPECT_EQ(row.shape(), Shape({2}));
  EXPECT_THAT(row.ToVector(), ElementsAre(2, 3));
  row.Assign(-1.0f);
  EXPECT_THAT(a.ToVector(), ElementsAre(0, 1, -1, -1, 4, 5));
}

// As MXNet's At: element i of a vector has shape (1,) (it was a 0-d
// array, which binds nowhere: "cannot infer the shapes of x").
TEST(NDArrayAt, OfAVectorIsAnElementOfShapeOne) {
  NDArray v = FromVector({4, 5, 6});
  NDArray e = v.At(2);
  EXPECT_EQ(e.shape(), Shape({1}));
  EXPECT_EQ(e.Scalar(), 6.0f);
  e.Assign(7.0f);  // a view
  EXPECT_THAT(v.ToVector(), ElementsAre(4, 5, 7));
}

TEST(NDArrayAt, OutOfRangeNamesTheIndexAndShape) {
  ExpectError(
      [] {
        Ones({3, 2}).At(3);
      },
      absl::StatusCode::kInvalidArgument, {"[3, 4)", "(3,2)"});
}

TEST(NDArrayReshape, KeepsValuesAndSharesMemory) {
  NDArray a = FromVector(Iota(6), {2, 3});
  NDArray r = a.Reshape({3, 2});
  EXPECT_EQ(r.shape(), Shape({3, 2}));
  EXPECT_THAT(r.ToVector(), ElementsAreArray(Iota(6)));
  EXPECT_THAT(r.At(2).ToVector(), ElementsAre(4, 5));
  EXPECT_TRUE(r.SharesStorageWith(a));
  r.At(0).Assign(9.0f);
  EXPECT_THAT(a.ToVector(), ElementsAre(9, 9, 2, 3, 4, 5));
}

TEST(NDArrayReshape, InfersOneMinusOneDimension) {
  NDArray a = Ones({2, 3});
  EXPECT_EQ(a.Reshape({-1, 2}).shape(), Shape({3, 2}));
  EXPECT_EQ(a.Reshape({6, -1}).shape(), Shape({6, 1}));
  EXPECT_EQ(a.Reshape({-1}).shape(), Shape({6}));
  EXPECT_EQ(a.Reshape({1, -1, 3}).shape(), Shape({1, 2, 3}));
}

// Shapes whose element count does not fit int64: their product wrapped to
// the array's size, and the view reached far beyond its memory.
TEST(NDArrayReshape, AShapeTooLargeToCountIsRefused) {
  for (const Shape& shape : {Shape{4, (int64_t{1} << 62) + 2}, Shape{int64_t{1} << 62, 4, -1}}) {
    SCOPED_TRACE(shape.ToString());
    try {
      Zeros({8}).Reshape(shape);
      FAIL() << "reshaped";
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("has too many elements"));
    }
  }
  EXPECT_THROW(Zeros({0}).Reshape({int64_t{1} << 32, int64_t{1} << 32}), Error);
  EXPECT_EQ(Zeros({0}).Reshape({int64_t{1} << 40, 0}).shape(), Shape({int64_t{1} << 40, 0}));
}

TEST(NDArrayReshape, OfASliceViewsOnlyTheSlice) {
  NDArray a = FromVector(Iota(12), {4, 3});
  NDArray r = a.Slice(1, 3).Reshape({-1});
  EXPECT_EQ(r.shape(), Shape({6}));
  EXPECT_THAT(r.ToVector(), ElementsAre(3, 4, 5, 6, 7, 8));
}

TEST(NDArrayReshape, ToAnotherSizeNamesBothShapesAndSizes) {
  ExpectError(
      [] {
        Ones({2, 3}).Reshape({4, 2});
      },
      absl::StatusCode::kInvalidArgument,
      {"(2,3)", "6 elements", "(4,2)", "8 elements"});
}

TEST(NDArrayReshape, RejectsTwoMinusOnes) {
  ExpectError(
      [] {
        Ones({2, 3}).Reshape({-1, -1});
      },
      absl::StatusCode::kInvalidArgument, {"more than one -1"});
}

TEST(NDArrayReshape, RejectsAMinusOneThatCannotBeInferred) {
  ExpectError(
      [] {
        Ones({2, 3}).Reshape({-1, 4});
      },
      absl::StatusCode::kInvalidArgument, {"(-1,4)", "(2,3)"});
}

TEST(NDArrayReshape, RejectsOtherNegativeDimensions) {
  ExpectError(
      [] {
        Ones({2, 3}).Reshape({-2, -3});
      },
      absl::StatusCode::kInvalidArgument, {"-2"});
}

// ---- Rebinding vs in place (the seed's r = a; a += b).

TEST(NDArrayRebind, AssigningAnExpressionRebindsOnlyThatHandle) {
  NDArray a = Ones({2});
  NDArray r = a;
  NDArray b = Ones({2});
  a = a + b;
  EXPECT_THAT(a.ToVector(), ElementsAre(2, 2));
  EXPECT_THAT(r.ToVector(), ElementsAre(1, 1));
  EXPECT_FALSE(r.SharesStorageWith(a));
}

TEST(NDArrayRebind, InPlaceAddChangesEveryHandleOfTheStorage) {
  NDArray a = Ones({2});
  NDArray r = a;
  NDArray b = Ones({2});
  a += b;
  EXPECT_THAT(a.ToVector(), ElementsAre(2, 2));
  EXPECT_THAT(r.ToVector(), ElementsAre(2, 2));
  EXPECT_TRUE(r.SharesStorageWith(a));
}

// ---- Arithmetic.

TEST(NDArrayArithmetic, ArrayWithArrayIsElementWise) {
  NDArray a = FromVector({1, 2, 3, 4}, {2, 2});
  NDArray b = FromVector({8, 6, -3, 0.5f}, {2, 2});
  EXPECT_THAT((a + b).ToVector(), ElementsAre(9, 8, 0, 4.5));
  EXPECT_THAT((a - b).ToVector(), ElementsAre(-7, -4, 6, 3.5));
  EXPECT_THAT((a * b).ToVector(), ElementsAre(8, 12, -9, 2));
  EXPECT_THAT((a / b).ToVector(),
              ElementsAre(0.125, FloatEq(2.0f / 6.0f), -1, 8));
  EXPECT_EQ((a + b).shape(), Shape({2, 2}));
}

TEST(NDArrayArithmetic, ResultIsANewArrayAndOperandsAreUnchanged) {
  NDArray a = FromVector({1, 2});
  NDArray b = FromVector({3, 4});
  NDArray c = a + b;
  EXPECT_FALSE(c.SharesStorageWith(a));
  EXPECT_FALSE(c.SharesStorageWith(b));
  EXPECT_THAT(a.ToVector(), ElementsAre(1, 2));
  EXPECT_THAT(b.ToVector(), ElementsAre(3, 4));
}

TEST(NDArrayArithmetic, ScalarOnEitherSide) {
  NDArray a = FromVector({1, 2, 4});
  EXPECT_THAT((a + 2.0f).ToVector(), ElementsAre(3, 4, 6));
  EXPECT_THAT((2.0f + a).ToVector(), ElementsAre(3, 4, 6));
  EXPECT_THAT((a - 2.0f).ToVector(), ElementsAre(-1, 0, 2));
  EXPECT_THAT((2.0f - a).ToVector(), ElementsAre(1, 0, -2));
  EXPECT_THAT((a * 3.0f).ToVector(), ElementsAre(3, 6, 12));
  EXPECT_THAT((3.0f * a).ToVector(), ElementsAre(3, 6, 12));
  EXPECT_THAT((a / 2.0f).ToVector(), ElementsAre(0.5, 1, 2));
  EXPECT_THAT((2.0f / a).ToVector(), ElementsAre(2, 1, 0.5));
}

TEST(NDArrayArithmetic, NegationFlipsTheSign) {
  EXPECT_THAT((-FromVector({1, -2, 0.5f})).ToVector(),
              ElementsAre(-1, 2, -0.5));
}

TEST(NDArrayArithmetic, ExpressionsCompose) {
  NDArray a = FromVector({1, 2, 3});
  NDArray b = FromVector({4, 5, 6});
  NDArray c = (a + b) * 2.0f - a / b + (-a);
  std::vector<float> av = {1, 2, 3}, bv = {4, 5, 6};
  std::vector<float> want;
  for (int i = 0; i < 3; ++i) {
    want.push_back((av[i] + bv[i]) * 2.0f - av[i] / bv[i] - av[i]);
  }
  EXPECT_THAT(c.ToVector(), Pointwise(FloatNear(1e-6f), want));
}

TEST(NDArrayArithmetic, InPlaceWithArrays) {
  NDArray a = FromVector({1, 2, 3});
  NDArray b = FromVector({2, 4, 8});
  a += b;
  EXPECT_THAT(a.ToVector(), ElementsAre(3, 6, 11));
  a -= b;
  EXPECT_THAT(a.ToVector(), ElementsAre(1, 2, 3));
  a *= b;
  EXPECT_THAT(a.ToVector(), ElementsAre(2, 8, 24));
  a /= b;
  EXPECT_THAT(a.ToVector(), ElementsAre(1, 2, 3));
  EXPECT_THAT(b.ToVector(), ElementsAre(2, 4, 8));
}

TEST(NDArrayArithmetic, InPlaceWithScalars) {
  NDArray a = FromVector({1, 2, 3});
  a += 1.0f;
  EXPECT_THAT(a.ToVector(), ElementsAre(2, 3, 4));
  a -= 0.5f;
  EXPECT_THAT(a.ToVector(), ElementsAre(1.5, 2.5, 3.5));
  a *= 2.0f;
  EXPECT_THAT(a.ToVector(), ElementsAre(3, 5, 7));
  a /= 4.0f;
  EXPECT_THAT(a.ToVector(), ElementsAre(0.75, 1.25, 1.75));
}

TEST(NDArrayArithmetic, InPlaceOperatorsReturnTheArrayForChaining) {
  NDArray a = Ones({2});
  NDArray b = Ones({2});
  EXPECT_EQ(&(a += b), &a);
  EXPECT_EQ(&(a *= 3.0f), &a);
  ((a -= 1.0f) /= 5.0f) += b;
  EXPECT_THAT(a.ToVector(), ElementsAre(2, 2));
}

TEST(NDArrayArithmetic, InPlaceWithItself) {
  NDArray a = FromVector({1, 2, 3});
  a += a;
  EXPECT_THAT(a.ToVector(), ElementsAre(2, 4, 6));
  a *= a;
  EXPECT_THAT(a.ToVector(), ElementsAre(4, 16, 36));
  a -= a;
  EXPECT_THAT(a.ToVector(), Each(0.0f));
}

TEST(NDArrayArithmetic, InPlaceWithAnOverlappingViewUsesTheOriginalValues) {
  // NumPy semantics: the right-hand side is read as it was before the
  // operation, even when it overlaps the array being written.
  NDArray a = FromVector({1, 2, 3, 4, 5, 6}, {2, 3});
  a -= a.Slice(0, 1);  // broadcast (1,3) over (2,3): subtract the first row
  EXPECT_THAT(a.ToVector(), ElementsAre(0, 0, 0, 3, 3, 3));

  NDArray b = FromVector(Iota(8), {4, 2});
  b.Slice(1, 4) += b.Slice(0, 3);  // same shape, shifted by one row
  EXPECT_THAT(b.ToVector(), ElementsAre(0, 1, 2, 4, 6, 8, 10, 12));

  NDArray c = FromVector(Iota(8), {4, 2});
  c.Slice(0, 3) *= c.Slice(1, 4);
  EXPECT_THAT(c.ToVector(), ElementsAre(0, 3, 8, 15, 24, 35, 6, 7));
}

TEST(NDArrayArithmetic, MismatchedShapesNameBothShapes) {
  ExpectError(
      [] {
        Ones({2, 3}) + Ones({3, 2});
      },
      absl::StatusCode::kInvalidArgument,
      {"add", "(2,3)", "(3,2)", "cannot be broadcast"});
  ExpectError(
      [] {
        Ones({2, 3}) * Ones({2});
      },
      absl::StatusCode::kInvalidArgument, {"(2,3)", "(2,)"});
  NDArray a = Ones({2, 3});
  ExpectError(
      [&] {
        a -= Ones({4, 3});
      },
      absl::StatusCode::kInvalidArgument, {"(2,3)", "(4,3)"});
}

TEST(NDArrayArithmetic, InPlaceRightHandSideMustBroadcastToTheLeft) {
  NDArray row = Ones({1, 3});
  ExpectError(
      [&] {
        row += Ones({2, 3});
      },
      absl::StatusCode::kInvalidArgument,
      {"(2,3)", "does not broadcast to", "(1,3)"});
  EXPECT_THAT(row.ToVector(), Each(1.0f));
}

// ---- Broadcasting.

// a op b computed on the host with NumPy broadcasting, for 2-D results.
std::vector<float> HostBroadcast2D(
    const std::vector<float>& a, int64_t ar, int64_t ac,
    const std::vector<float>& b, int64_t br, int64_t bc,
    const std::function<float(float, float)>& f) {
  const int64_t rows = std::max(ar, br), cols = std::max(ac, bc);
  std::vector<float> out;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      float x = a[(ar == 1 ? 0 : i) * ac + (ac == 1 ? 0 : j)];
      float y = b[(br == 1 ? 0 : i) * bc + (bc == 1 ? 0 : j)];
      out.push_back(f(x, y));
    }
  }
  return out;
}

TEST(NDArrayBroadcast, RowVectorAppliesToEveryRow) {
  NDArray a = FromVector(Iota(6), {2, 3});
  NDArray row = FromVector({10, 20, 30}, {1, 3});
  NDArray c = a + row;
  EXPECT_EQ(c.shape(), Shape({2, 3}));
  EXPECT_THAT(c.ToVector(), ElementsAre(10, 21, 32, 13, 24, 35));
  EXPECT_THAT((row - a).ToVector(), ElementsAre(10, 19, 28, 7, 16, 25));
}

TEST(NDArrayBroadcast, ColumnVectorAppliesToEveryColumn) {
  NDArray a = FromVector(Iota(6), {2, 3});
  NDArray col = FromVector({100, 200}, {2, 1});
  EXPECT_THAT((a + col).ToVector(), ElementsAre(100, 101, 102, 203, 204, 205));
  EXPECT_THAT((a / col).ToVector(),
              ElementsAre(0, 0.01f, 0.02f, 0.015f, 0.02f, 0.025f));
}

TEST(NDArrayBroadcast, OneDimensionalArrayActsAsARow) {
  NDArray a = FromVector(Iota(6), {2, 3});
  NDArray v = FromVector({1, 2, 3});
  NDArray c = a * v;
  EXPECT_EQ(c.shape(), Shape({2, 3}));
  EXPECT_THAT(c.ToVector(), ElementsAre(0, 2, 6, 3, 8, 15));
  EXPECT_EQ((v * a).shape(), Shape({2, 3}));
}

TEST(NDArrayBroadcast, RowAndColumnMakeAnOuterResult) {
  NDArray col = FromVector({1, 2, 3}, {3, 1});
  NDArray row = FromVector({10, 20}, {1, 2});
  NDArray c = col - row;
  EXPECT_EQ(c.shape(), Shape({3, 2}));
  EXPECT_THAT(c.ToVector(), ElementsAre(-9, -19, -8, -18, -7, -17));
}

TEST(NDArrayBroadcast, NonCommutativeOperationsKeepOperandOrder) {
  const std::vector<float> av = RandomValues(4 * 5, 1), bv = RandomValues(5, 2);
  NDArray a = FromVector(av, {4, 5});
  NDArray b = FromVector(bv, {1, 5});
  EXPECT_THAT((a - b).ToVector(),
              Pointwise(FloatEq(), HostBroadcast2D(av, 4, 5, bv, 1, 5,
                                                   std::minus<float>())));
  EXPECT_THAT((b - a).ToVector(),
              Pointwise(FloatEq(), HostBroadcast2D(bv, 1, 5, av, 4, 5,
                                                   std::minus<float>())));
  EXPECT_THAT((b / a).ToVector(),
              Pointwise(FloatEq(), HostBroadcast2D(bv, 1, 5, av, 4, 5,
                                                   std::divides<float>())));
}

TEST(NDArrayBroadcast, ThreeDimensionalShapesAlignFromTheRight) {
  // (2,1,3) with (4,1) -> (2,4,3).
  const std::vector<float> av = Iota(6), bv = Iota(4, 10);
  NDArray c = FromVector(av, {2, 1, 3}) * FromVector(bv, {4, 1});
  ASSERT_EQ(c.shape(), Shape({2, 4, 3}));
  std::vector<float> want;
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 4; ++j) {
      for (int k = 0; k < 3; ++k) want.push_back(av[i * 3 + k] * bv[j]);
    }
  }
  EXPECT_THAT(c.ToVector(), ElementsAreArray(want));
}

TEST(NDArrayBroadcast, ZeroDimensionalArrayBroadcastsEverywhere) {
  NDArray s = FromVector({2}, Shape{});
  NDArray a = FromVector(Iota(4), {2, 2});
  EXPECT_THAT((a * s).ToVector(), ElementsAre(0, 2, 4, 6));
  EXPECT_THAT((s - a).ToVector(), ElementsAre(2, 1, 0, -1));
}

TEST(NDArrayBroadcast, InPlaceWithARowAndAColumn) {
  NDArray a = Zeros({2, 3});
  a += FromVector({1, 2, 3}, {1, 3});
  a *= FromVector({10, -1}, {2, 1});
  EXPECT_THAT(a.ToVector(), ElementsAre(10, 20, 30, -1, -2, -3));
  a -= FromVector({1, 1, 1});
  EXPECT_THAT(a.ToVector(), ElementsAre(9, 19, 29, -2, -3, -4));
}

TEST(NDArrayBroadcast, MaximumAndMinimumBroadcast) {
  NDArray a = FromVector({1, 5, 3, 7}, {2, 2});
  NDArray row = FromVector({4, 4}, {1, 2});
  EXPECT_THAT(Maximum(a, row).ToVector(), ElementsAre(4, 5, 4, 7));
  EXPECT_THAT(Minimum(a, row).ToVector(), ElementsAre(1, 4, 3, 4));
}

// ---- Axpby and Dot.

TEST(NDArrayAxpby, ComputesAlphaXPlusBetaY) {
  NDArray x = FromVector({1, 2, 3});
  NDArray y = FromVector({10, 20, 30});
  EXPECT_THAT(Axpby(2, x, -0.5f, y).ToVector(), ElementsAre(-3, -6, -9));
  EXPECT_THAT(x.ToVector(), ElementsAre(1, 2, 3));
}

TEST(NDArrayAxpby, RequiresEqualShapes) {
  ExpectError([] { Axpby(1, Ones({2}), 1, Ones({3})); },
              absl::StatusCode::kInvalidArgument, {"Axpby", "(2,)", "(3,)"});
}

// out = op(a) * op(b) with a naive triple loop; a and b as stored.
std::vector<float> HostDot(const std::vector<float>& a, int64_t ar, int64_t ac,
                           const std::vector<float>& b, int64_t br, int64_t bc,
                           bool ta, bool tb) {
  const int64_t m = ta ? ac : ar, k = ta ? ar : ac, n = tb ? br : bc;
  std::vector<float> out(m * n, 0.0f);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0;
      for (int64_t p = 0; p < k; ++p) {
        float x = ta ? a[p * ac + i] : a[i * ac + p];
        float y = tb ? b[j * bc + p] : b[p * bc + j];
        acc += static_cast<double>(x) * y;
      }
      out[i * n + j] = static_cast<float>(acc);
    }
  }
  return out;
}

TEST(NDArrayDot, MatchesANaiveProductForEveryTransposeCombination) {
  const int64_t m = 5, k = 7, n = 3;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      const int64_t ar = ta ? k : m, ac = ta ? m : k;
      const int64_t br = tb ? n : k, bc = tb ? k : n;
      const std::vector<float> av = RandomValues(ar * ac, 11);
      const std::vector<float> bv = RandomValues(br * bc, 12);
      NDArray c =
          Dot(FromVector(av, {ar, ac}), FromVector(bv, {br, bc}), ta, tb);
      ASSERT_EQ(c.shape(), Shape({m, n})) << "ta=" << ta << " tb=" << tb;
      EXPECT_THAT(
          c.ToVector(),
          Pointwise(FloatNear(1e-5f), HostDot(av, ar, ac, bv, br, bc, ta, tb)))
          << "ta=" << ta << " tb=" << tb;
    }
  }
}

TEST(NDArrayDot, LargerNonSquareProduct) {
  const std::vector<float> av = RandomValues(37 * 64, 3),
                           bv = RandomValues(64 * 19, 4);
  NDArray c = Dot(FromVector(av, {37, 64}), FromVector(bv, {64, 19}));
  ASSERT_EQ(c.shape(), Shape({37, 19}));
  EXPECT_THAT(c.ToVector(),
              Pointwise(FloatNear(1e-4f),
                        HostDot(av, 37, 64, bv, 64, 19, false, false)));
}

TEST(NDArrayDot, OfSlicesUsesOnlyTheSlices) {
  const std::vector<float> av = Iota(12);
  NDArray a = FromVector(av, {4, 3});
  NDArray c = Dot(a.Slice(1, 3), a.Slice(0, 3));  // (2,3) x (3,3)
  std::vector<float> a_rows(av.begin() + 3, av.begin() + 9);
  std::vector<float> b_rows(av.begin(), av.begin() + 9);
  EXPECT_THAT(c.ToVector(),
              Pointwise(FloatNear(1e-4f),
                        HostDot(a_rows, 2, 3, b_rows, 3, 3, false, false)));
}

TEST(NDArrayDot, EmptyInnerDimensionGivesZeros) {
  NDArray c = Dot(Ones({2, 0}), Ones({0, 3}));
  EXPECT_EQ(c.shape(), Shape({2, 3}));
  EXPECT_THAT(c.ToVector(), Each(0.0f));
  EXPECT_EQ(Dot(Ones({0, 4}), Ones({4, 3})).shape(), Shape({0, 3}));
}

TEST(NDArrayDot, MismatchedInnerDimensionsNameBothShapes) {
  ExpectError(
      [] {
        Dot(Ones({2, 3}), Ones({4, 2}));
      },
      absl::StatusCode::kInvalidArgument,
      {"inner dimensions", "(2,3)", "(4,2)"});
  EXPECT_EQ(Dot(Ones({2, 3}), Ones({2, 3}), false, true).shape(),
            Shape({2, 2}));
  ExpectError(
      [] {
        Dot(Ones({2, 3}), Ones({2, 3}), true, true);
      },
      absl::StatusCode::kInvalidArgument, {"(2,3)ᵀ"});
}

TEST(NDArrayDot, RequiresTwoDimensionalArguments) {
  ExpectError([] { Dot(Ones({3}), Ones({3})); },
              absl::StatusCode::kInvalidArgument, {"2-D", "(3,)"});
}

// ---- Element-wise functions.

const std::vector<float>& SampleValues() {
  static const std::vector<float> v = {-3.0f, -1.5f, -0.25f, 0.0f,
                                       0.5f,  1.0f,  2.0f,   4.0f};
  return v;
}

std::vector<float> HostMap(const std::vector<float>& v, float (*f)(float)) {
  std::vector<float> out;
  for (float x : v) out.push_back(f(x));
  return out;
}

TEST(NDArrayElementwise, TranscendentalFunctionsMatchTheStandardLibrary) {
  NDArray a = FromVector(SampleValues());
  EXPECT_THAT(Exp(a).ToVector(),
              Pointwise(FloatNear(1e-5f), HostMap(SampleValues(), [](float x) {
                          return std::exp(x);
                        })));
  EXPECT_THAT(Tanh(a).ToVector(),
              Pointwise(FloatNear(1e-6f), HostMap(SampleValues(), [](float x) {
                          return std::tanh(x);
                        })));
  EXPECT_THAT(Sigmoid(a).ToVector(),
              Pointwise(FloatNear(1e-6f), HostMap(SampleValues(), [](float x) {
                          return 1.0f / (1.0f + std::exp(-x));
                        })));
  NDArray pos = FromVector({0.25f, 1.0f, 2.0f, 9.0f});
  EXPECT_THAT(Log(pos).ToVector(),
              Pointwise(FloatNear(1e-6f),
                        std::vector<float>{std::log(0.25f), 0.0f,
                                           std::log(2.0f), std::log(9.0f)}));
  EXPECT_THAT(Sqrt(pos).ToVector(),
              ElementsAre(0.5, 1, FloatEq(std::sqrt(2.0f)), 3));
}

TEST(NDArrayElementwise, PiecewiseFunctions) {
  NDArray a = FromVector(SampleValues());
  EXPECT_THAT(Square(a).ToVector(),
              ElementsAre(9, 2.25, 0.0625, 0, 0.25, 1, 4, 16));
  EXPECT_THAT(Abs(a).ToVector(), ElementsAre(3, 1.5, 0.25, 0, 0.5, 1, 2, 4));
  EXPECT_THAT(Sign(a).ToVector(), ElementsAre(-1, -1, -1, 0, 1, 1, 1, 1));
  EXPECT_THAT(Relu(a).ToVector(), ElementsAre(0, 0, 0, 0, 0.5, 1, 2, 4));
  EXPECT_THAT(Clip(a, -1, 1.5f).ToVector(),
              ElementsAre(-1, -1, -0.25, 0, 0.5, 1, 1.5, 1.5));
  EXPECT_THAT(Maximum(a, 0.5f).ToVector(),
              ElementsAre(0.5, 0.5, 0.5, 0.5, 0.5, 1, 2, 4));
  EXPECT_THAT(Minimum(a, 0.0f).ToVector(),
              ElementsAre(-3, -1.5, -0.25, 0, 0, 0, 0, 0));
}

TEST(NDArrayElementwise, LogAndSqrtOfInvalidInputFollowIeee) {
  std::vector<float> log = Log(FromVector({0.0f, -1.0f})).ToVector();
  EXPECT_TRUE(std::isinf(log[0]) && log[0] < 0);
  EXPECT_TRUE(std::isnan(log[1]));
  EXPECT_TRUE(std::isnan(Sqrt(FromVector({-4.0f})).ToVector()[0]));
}

TEST(NDArrayElementwise, MaximumAndMinimumOfTwoArrays) {
  NDArray a = FromVector({1, 5, -2});
  NDArray b = FromVector({3, 4, -2});
  EXPECT_THAT(Maximum(a, b).ToVector(), ElementsAre(3, 5, -2));
  EXPECT_THAT(Minimum(a, b).ToVector(), ElementsAre(1, 4, -2));
}

TEST(NDArrayElementwise, FunctionsKeepTheShapeAndLeaveTheInput) {
  NDArray a = FromVector(Iota(6, -3), {3, 2});
  NDArray r = Relu(a);
  EXPECT_EQ(r.shape(), Shape({3, 2}));
  EXPECT_FALSE(r.SharesStorageWith(a));
  EXPECT_THAT(a.ToVector(), ElementsAreArray(Iota(6, -3)));
}

TEST(NDArrayElementwise, ClipWithInvertedBoundsIsAnError) {
  ExpectError([] { Clip(Ones({2}), 2, 1); }, absl::StatusCode::kInvalidArgument,
              {"Clip", "2", "1"});
}

// ---- Reductions.

TEST(NDArrayReduce, OverEverythingGivesShapeOne) {
  NDArray a = FromVector({1, 2, 3, 4, 5, 6}, {2, 3});
  NDArray s = Sum(a);
  EXPECT_EQ(s.shape(), Shape({1}));
  EXPECT_EQ(s.Scalar(), 21.0f);
  EXPECT_EQ(Mean(a).Scalar(), 3.5f);
  EXPECT_EQ(Max(a).Scalar(), 6.0f);
  EXPECT_EQ(Min(a).Scalar(), 1.0f);
  EXPECT_FLOAT_EQ(Norm(a).Scalar(), std::sqrt(91.0f));
}

TEST(NDArrayReduce, MaxAndMinOfNegativeValues) {
  NDArray a = FromVector({-5, -2, -9});
  EXPECT_EQ(Max(a).Scalar(), -2.0f);
  EXPECT_EQ(Min(a).Scalar(), -9.0f);
}

TEST(NDArrayReduce, AlongEachAxisOfAMatrix) {
  NDArray a = FromVector({1, 2, 3, 4, 5, 6}, {2, 3});
  NDArray s0 = Sum(a, 0);
  EXPECT_EQ(s0.shape(), Shape({3}));
  EXPECT_THAT(s0.ToVector(), ElementsAre(5, 7, 9));
  NDArray s1 = Sum(a, 1);
  EXPECT_EQ(s1.shape(), Shape({2}));
  EXPECT_THAT(s1.ToVector(), ElementsAre(6, 15));
  EXPECT_THAT(Mean(a, 0).ToVector(), ElementsAre(2.5, 3.5, 4.5));
  EXPECT_THAT(Max(a, 1).ToVector(), ElementsAre(3, 6));
  EXPECT_THAT(Min(a, 0).ToVector(), ElementsAre(1, 2, 3));
  EXPECT_THAT(Norm(a, 1).ToVector(), ElementsAre(FloatEq(std::sqrt(14.0f)),
                                                 FloatEq(std::sqrt(77.0f))));
}

TEST(NDArrayReduce, NegativeAxisCountsFromTheEnd) {
  NDArray a = FromVector({1, 2, 3, 4, 5, 6}, {2, 3});
  EXPECT_EQ(Sum(a, -1).ToVector(), Sum(a, 1).ToVector());
  EXPECT_EQ(Sum(a, -2).ToVector(), Sum(a, 0).ToVector());
  EXPECT_EQ(Max(a, -1).shape(), Shape({2}));
}

TEST(NDArrayReduce, KeepdimsLeavesTheAxisWithSizeOne) {
  NDArray a = FromVector({1, 2, 3, 4, 5, 6}, {2, 3});
  NDArray s0 = Sum(a, 0, /*keepdims=*/true);
  EXPECT_EQ(s0.shape(), Shape({1, 3}));
  EXPECT_THAT(s0.ToVector(), ElementsAre(5, 7, 9));
  NDArray m1 = Mean(a, -1, /*keepdims=*/true);
  EXPECT_EQ(m1.shape(), Shape({2, 1}));
  EXPECT_THAT(m1.ToVector(), ElementsAre(2, 5));
  // Keepdims results broadcast back against the input (centering rows).
  EXPECT_THAT((a - m1).ToVector(), ElementsAre(-1, 0, 1, -1, 0, 1));
}

TEST(NDArrayReduce, MiddleAxisOfAThreeDimensionalArray) {
  const std::vector<float> v = RandomValues(2 * 3 * 4, 21);
  NDArray a = FromVector(v, {2, 3, 4});
  NDArray s = Sum(a, 1);
  NDArray mx = Max(a, 1);
  ASSERT_EQ(s.shape(), Shape({2, 4}));
  std::vector<float> want_sum, want_max;
  for (int i = 0; i < 2; ++i) {
    for (int k = 0; k < 4; ++k) {
      float sum = 0, m = -1e30f;
      for (int j = 0; j < 3; ++j) {
        sum += v[(i * 3 + j) * 4 + k];
        m = std::max(m, v[(i * 3 + j) * 4 + k]);
      }
      want_sum.push_back(sum);
      want_max.push_back(m);
    }
  }
  EXPECT_THAT(s.ToVector(), Pointwise(FloatNear(1e-5f), want_sum));
  EXPECT_THAT(mx.ToVector(), ElementsAreArray(want_max));
  EXPECT_EQ(Sum(a, 2, true).shape(), Shape({2, 3, 1}));
}

TEST(NDArrayReduce, AxisOutOfRangeNamesTheAxisAndShape) {
  NDArray a = Ones({2, 3});
  ExpectError([&] { Sum(a, 2); }, absl::StatusCode::kInvalidArgument,
              {"axis 2", "(2,3)"});
  ExpectError([&] { Mean(a, -3); }, absl::StatusCode::kInvalidArgument,
              {"axis -3", "(2,3)"});
  ExpectError([&] { Max(FromVector({1}, Shape{}), 0); },
              absl::StatusCode::kInvalidArgument, {"axis 0"});
}

TEST(NDArrayReduce, EmptyArrays) {
  NDArray e = Zeros({0, 3});
  EXPECT_EQ(Sum(e).Scalar(), 0.0f);
  EXPECT_THAT(Sum(e, 0).ToVector(), ElementsAre(0, 0, 0));
  ExpectError([&] { Max(e); }, absl::StatusCode::kInvalidArgument,
              {"empty", "(0,3)"});
}

// ---- Random numbers.

TEST(NDArrayRandom, SameSeedGivesTheSameValues) {
  srand(42);
  std::vector<float> u1 = RandomUniform(0, 1, {50}).ToVector();
  std::vector<float> n1 = RandomNormal(0, 1, {3, 7}).ToVector();
  srand(42);
  std::vector<float> u2 = RandomUniform(0, 1, {50}).ToVector();
  std::vector<float> n2 = RandomNormal(0, 1, {3, 7}).ToVector();
  EXPECT_EQ(u1, u2);
  EXPECT_EQ(n1, n2);
}

TEST(NDArrayRandom, SameSeedGivesTheSameValuesWhenResultsAreReadLate) {
  // Seeds are drawn when operations are pushed, not when they run.
  srand(7);
  NDArray a = RandomUniform(-1, 1, {1000});
  NDArray b = RandomNormal(0, 1, {1000});
  std::vector<float> bv = b.ToVector(), av = a.ToVector();
  srand(7);
  EXPECT_EQ(RandomUniform(-1, 1, {1000}).ToVector(), av);
  EXPECT_EQ(RandomNormal(0, 1, {1000}).ToVector(), bv);
}

TEST(NDArrayRandom, NextRandomSeedFollowsSrand) {
  srand(9);
  const uint64_t a = NextRandomSeed(), b = NextRandomSeed();
  srand(9);
  EXPECT_EQ(NextRandomSeed(), a);
  EXPECT_EQ(NextRandomSeed(), b);
  EXPECT_NE(a, b);
}

TEST(NDArrayRandom, DifferentSeedsOrSuccessiveDrawsDiffer) {
  srand(1);
  std::vector<float> a = RandomUniform(0, 1, {20}).ToVector();
  std::vector<float> a_next = RandomUniform(0, 1, {20}).ToVector();
  srand(2);
  std::vector<float> b = RandomUniform(0, 1, {20}).ToVector();
  EXPECT_NE(a, b);
  EXPECT_NE(a, a_next);
}

TEST(NDArrayRandom, UniformStaysInRangeAndCoversIt) {
  srand(3);
  std::vector<float> v = RandomUniform(-2, 3, {20000}).ToVector();
  double sum = 0;
  float lo = 1e9f, hi = -1e9f;
  for (float x : v) {
    ASSERT_GE(x, -2.0f);
    ASSERT_LE(x, 3.0f);
    sum += x;
    lo = std::min(lo, x);
    hi = std::max(hi, x);
  }
  EXPECT_NEAR(sum / v.size(), 0.5, 0.05);
  EXPECT_LT(lo, -1.99f);
  EXPECT_GT(hi, 2.99f);
}

TEST(NDArrayRandom, NormalHasTheRequestedMeanAndStddev) {
  srand(4);
  std::vector<float> v = RandomNormal(1.5f, 2.0f, {100000}).ToVector();
  double sum = 0, sq = 0;
  for (float x : v) sum += x;
  const double mean = sum / v.size();
  for (float x : v) sq += (x - mean) * (x - mean);
  const double stddev = std::sqrt(sq / v.size());
  // Standard errors: 0.0063 for the mean, 0.0045 for the stddev.
  EXPECT_NEAR(mean, 1.5, 0.04);
  EXPECT_NEAR(stddev, 2.0, 0.03);
}

TEST(NDArrayRandom, SampleIntoAnExistingArrayOrSlice) {
  NDArray a = Zeros({4, 5});
  NDArray rows = a.Slice(1, 3);
  srand(5);
  SampleUniform(10, 11, &rows);
  std::vector<float> v = a.ToVector();
  for (int i = 0; i < 20; ++i) {
    if (i >= 5 && i < 15) {
      EXPECT_GE(v[i], 10.0f) << i;
      EXPECT_LE(v[i], 11.0f) << i;
    } else {
      EXPECT_EQ(v[i], 0.0f) << i;
    }
  }
  SampleNormal(0, 1, &a);
  EXPECT_NE(a.ToVector(), std::vector<float>(20, 0.0f));
}

TEST(NDArrayRandom, InvalidParametersAreErrors) {
  NDArray a = Zeros({3});
  ExpectError([&] { SampleUniform(2, 1, &a); },
              absl::StatusCode::kInvalidArgument, {"low 2", "high 1"});
  ExpectError([&] { SampleNormal(0, -1, &a); },
              absl::StatusCode::kInvalidArgument, {"stddev -1"});
  ExpectError([] { RandomUniform(0, 1, {-1}); },
              absl::StatusCode::kInvalidArgument, {"(-1,)"});
}

// ---- Printing.

TEST(NDArrayPrint, MatrixHasAHeaderAndOneLinePerRow) {
  EXPECT_EQ(Zeros({2, 3}).ToString(),
            "2×3 NDArray<float> @ cpu(0):\n"
            "0.0  0.0  0.0\n"
            "0.0  0.0  0.0\n");
  EXPECT_EQ(Ones({2, 3}).ToString(),
            "2×3 NDArray<float> @ cpu(0):\n"
            "1.0  1.0  1.0\n"
            "1.0  1.0  1.0\n");
}

TEST(NDArrayPrint, ColumnsAreRightAligned) {
  EXPECT_EQ(FromVector({1, -2.5f, 100, 0.125f}, {2, 2}).ToString(),
            "2×2 NDArray<float> @ cpu(0):\n"
            "  1.0   -2.5\n"
            "100.0  0.125\n");
}

TEST(NDArrayPrint, VectorPrintsOneValuePerLine) {
  EXPECT_EQ(FromVector({1, 2.5f, -3}).ToString(),
            "3 NDArray<float> @ cpu(0):\n"
            " 1.0\n"
            " 2.5\n"
            "-3.0\n");
}

TEST(NDArrayPrint, StreamOperatorPrintsTheSameAndNamesTheContext) {
  NDArray a = Full({1, 2}, 0.5f, cpu(2));
  std::ostringstream os;
  os << a;
  EXPECT_EQ(os.str(), a.ToString());
  EXPECT_EQ(os.str(), "1×2 NDArray<float> @ cpu(2):\n0.5  0.5\n");
}

TEST(NDArrayPrint, ZeroDimensionalAndEmptyArrays) {
  EXPECT_EQ(FromVector({5}, Shape{}).ToString(),
            "0-dimensional NDArray<float> @ cpu(0):\n5.0\n");
  EXPECT_EQ(Zeros({0, 3}).ToString(), "0×3 NDArray<float> @ cpu(0):\n");
}

TEST(NDArrayPrint, LongRowIsElidedWithAnEllipsis) {
  EXPECT_EQ(FromVector(Iota(10), {1, 10}).ToString(),
            "1×10 NDArray<float> @ cpu(0):\n"
            "0.0  1.0  2.0  3.0  …  6.0  7.0  8.0  9.0\n");
  // Nine fit without elision.
  EXPECT_EQ(FromVector(Iota(9), {1, 9}).ToString(),
            "1×9 NDArray<float> @ cpu(0):\n"
            "0.0  1.0  2.0  3.0  4.0  5.0  6.0  7.0  8.0\n");
}

TEST(NDArrayPrint, LongVectorIsElidedWithAVerticalEllipsis) {
  EXPECT_EQ(FromVector(Iota(12)).ToString(),
            "12 NDArray<float> @ cpu(0):\n"
            " 0.0\n 1.0\n 2.0\n 3.0\n   ⋮\n 8.0\n 9.0\n10.0\n11.0\n");
}

TEST(NDArrayPrint, LargeMatrixShowsOnlyItsCorners) {
  std::string s = FromVector(Iota(400), {20, 20}).ToString();
  std::vector<std::string> lines;
  std::istringstream in(s);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  ASSERT_EQ(lines.size(), 10u) << s;  // header, 4 rows, ⋮, 4 rows
  EXPECT_EQ(lines[0], "20×20 NDArray<float> @ cpu(0):");
  EXPECT_THAT(lines[1], HasSubstr("…"));
  EXPECT_THAT(lines[5], HasSubstr("⋮"));
  EXPECT_THAT(lines[5], HasSubstr("⋱"));
  EXPECT_THAT(lines[1], ::testing::StartsWith("  0.0    1.0    2.0    3.0  …"));
  EXPECT_THAT(lines[9], ::testing::EndsWith("396.0  397.0  398.0  399.0"));
  EXPECT_THAT(s, ::testing::Not(HasSubstr("200.0")));  // row 10 is elided
}

TEST(NDArrayPrint, ThreeDimensionalArrayPrintsOneMatrixPerLeadingIndex) {
  EXPECT_EQ(FromVector(Iota(8), {2, 2, 2}).ToString(),
            "2×2×2 NDArray<float> @ cpu(0):\n"
            "[0,:,:] =\n0.0  1.0\n2.0  3.0\n\n"
            "[1,:,:] =\n4.0  5.0\n6.0  7.0\n\n");
}

TEST(NDArrayPrint, NonIntegralAndSpecialValues) {
  std::string s = FromVector({0.1f, 1e-7f, 123456.0f,
                              std::numeric_limits<float>::infinity()})
                      .ToString();
  EXPECT_THAT(s, HasSubstr("0.1\n"));
  EXPECT_THAT(s, HasSubstr("1e-07\n"));
  EXPECT_THAT(s, HasSubstr("123456.0\n"));
  EXPECT_THAT(s, HasSubstr("inf\n"));
}

// ---- Asynchrony, pooling and threads.

TEST(NDArrayAsync, LongChainOfDependentOperationsGivesTheSequentialResult) {
  NDArray a = Zeros({64});
  NDArray b = Ones({64});
  for (int i = 0; i < 500; ++i) {
    a += b;
    if (i % 100 == 99) b = b * 2.0f;  // rebinds b to a new array
  }
  const float want = 100 * (1 + 2 + 4 + 8 + 16);
  EXPECT_THAT(a.ToVector(), Each(want));
  WaitAll();
}

TEST(NDArrayAsync, IndependentThreadsComputeCorrectly) {
  std::vector<std::thread> threads;
  std::vector<std::vector<float>> results(4);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([t, &results] {
      NDArray w = Full({16, 16}, static_cast<float>(t));
      NDArray g = Ones({16, 16});
      for (int i = 0; i < 50; ++i) w += 0.5f * g;
      results[t] = Sum(w, 0).ToVector();
    });
  }
  for (std::thread& th : threads) th.join();
  for (int t = 0; t < 4; ++t) {
    EXPECT_THAT(results[t], Each(16 * (t + 25.0f))) << "thread " << t;
  }
}

TEST(NDArrayAsync, ExpressionTemporariesAreServedFromThePool) {
  if (!Storage::Get()->pooling()) GTEST_SKIP() << "pooling is off";
  NDArray w = Ones({128, 64});
  NDArray g = Ones({128, 64});
  WaitAll();
  const StorageStats before = Storage::Get()->Stats(cpu());
  for (int i = 0; i < 20; ++i) {
    // Four temporaries of 32 KiB per step, freed once their readers ran.
    w += 0.1f * (2.0f * g + 0.01f * w);
    WaitAll();
  }
  const StorageStats after = Storage::Get()->Stats(cpu());
  EXPECT_EQ(after.allocs - before.allocs, 80u);
  // Every step after the first reuses the previous step's blocks.
  EXPECT_GE(after.pool_hits - before.pool_hits, 76u);
  EXPECT_EQ(after.bytes_in_use, before.bytes_in_use);
}

// cpu_pinned arrays compute as CPU ones (they are host memory) and move to
// and from other contexts by copies, like any context.
TEST(NDArrayContexts, PinnedHostArraysComputeAsOnTheCpu) {
  NDArray p = FromVector({1, 2, 3, 4}, {2, 2}).Copy(cpu_pinned());
  EXPECT_EQ(p.context(), cpu_pinned());
  NDArray q = Ones({2, 2}, cpu_pinned());
  p += q * 2.0f;
  EXPECT_EQ(p.ToVector(), (std::vector<float>{3, 4, 5, 6}));
  EXPECT_EQ(Dot(p, q).ToVector(), (std::vector<float>{7, 7, 11, 11}));
  EXPECT_EQ(Dot(p, q).context(), cpu_pinned());
  NDArray c = Zeros({2, 2});
  c.Assign(p);
  p.Assign(c + 1.0f);
  EXPECT_EQ(p.ToVector(), (std::vector<float>{4, 5, 6, 7}));
  ExpectError([&] { c + p; }, absl::StatusCode::kInvalidArgument,
              {"add", "cpu(0)", "cpu_pinned(0)"});
}

TEST(NDArrayContexts, MixingContextsInOneOperationIsRefusedNamingBoth) {
  NDArray a = Ones({2, 2}, cpu(0));
  NDArray b = Ones({2, 2}, cpu(1));
  ExpectError([&] { a + b; }, absl::StatusCode::kInvalidArgument, {"add", "cpu(0)", "cpu(1)"});
  ExpectError([&] { a += b; }, absl::StatusCode::kInvalidArgument, {"+=", "cpu(1)"});
  ExpectError([&] { Dot(a, b); }, absl::StatusCode::kInvalidArgument, {"dot", "cpu(1)"});
  // A copy moves data between contexts.
  a += b.Copy(cpu(0));
  EXPECT_THAT(a.ToVector(), Each(2.0f));
}

}  // namespace
}  // namespace mx

namespace mx {
namespace {

// NaN wins in relu, maximum, minimum and the max and min reductions, as in
// MXNet (mshadow_op.h): relu turned NaN into 0, and max over {NaN, 1} was 1
// or NaN by the elements' order, so a diverging layer hid from the loss.
TEST(NDArrayNaN, ReluMaximumMinimumAndMaxMinKeepNaN) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  auto all_nan = [](const NDArray& a) {
    for (float v : a.ToVector()) {
      if (!std::isnan(v)) return false;
    }
    return true;
  };
  EXPECT_TRUE(all_nan(Relu(FromVector({nan}))));
  EXPECT_THAT(Relu(FromVector({-1, 2})).ToVector(), ElementsAre(0, 2));
  for (const std::vector<float>& v : {std::vector<float>{nan, 1}, std::vector<float>{1, nan}}) {
    EXPECT_TRUE(all_nan(Max(FromVector(v))));
    EXPECT_TRUE(all_nan(Min(FromVector(v))));
  }
  EXPECT_TRUE(all_nan(Maximum(FromVector({nan}), 3.0f)));
  EXPECT_TRUE(all_nan(Minimum(FromVector({nan}), 3.0f)));
  EXPECT_TRUE(all_nan(Maximum(FromVector({nan, 1}), FromVector({1, nan}))));
  EXPECT_TRUE(all_nan(Minimum(FromVector({nan, 1}), FromVector({1, nan}))));
  EXPECT_THAT(Maximum(FromVector({1, 5}), FromVector({3, 2})).ToVector(), ElementsAre(3, 5));
  EXPECT_THAT(Max(FromVector({1, 5, -2})).ToVector(), ElementsAre(5));
  EXPECT_THAT(Min(FromVector({1, 5, -2})).ToVector(), ElementsAre(-2));
}

}  // namespace
}  // namespace mx
