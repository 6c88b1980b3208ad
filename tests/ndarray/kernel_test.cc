// The kernel layer (ndarray/kernel.h, ndarray/launch.h) on the CPU: the
// bodies the GPU runs, driven the way the GPU drives them.
#include "ndarray/kernel.h"

#include <cblas.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ndarray/launch.h"
#include "ndarray/nn_kernels.h"
#include "tests/ndarray/random_values.h"

namespace mx::kernel {
namespace {

using ::testing::ElementsAre;
using ::testing::Pointwise;
using ::testing::FloatEq;

// Random123's known-answer vectors for Philox4x32-10 (kat_vectors).
TEST(Philox, MatchesTheReferenceKnownAnswers) {
  Philox r = Philox4x32(0, 0, 0, 0, 0, 0);
  EXPECT_THAT(r.v, ElementsAre(0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u));
  r = Philox4x32(~0u, ~0u, ~0u, ~0u, ~0u, ~0u);
  EXPECT_THAT(r.v, ElementsAre(0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu));
  r = Philox4x32(0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u, 0x299f31d0u);
  EXPECT_THAT(r.v, ElementsAre(0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u));
}

// The GPU calls MapRange(i, i + 1) per thread; the CPU calls MapRange(0, n).
// Both must write the same values, for any split.
template <typename K>
void ExpectSplitsAgree(int64_t n, typename K::Params whole, typename K::Params split,
                       const std::vector<float>& whole_out, const std::vector<float>& split_out) {
  K::MapRange(0, n, whole);
  for (int64_t i = 0; i < n; ++i) K::MapRange(i, i + 1, split);
  EXPECT_THAT(split_out, Pointwise(FloatEq(), whole_out));
}

// From kSplitElements elements on (indices times index_cost), Launch runs
// a CPU kernel as ranges on the CPU pool: every index exactly once,
// whatever the split. An in-place add (out = a + 1) shows an index run
// twice or never.
TEST(Launch, LargeCpuKernelsRunEveryIndexOnceWhetherSplitOrNot) {
  struct Case {
    int64_t n, index_cost;
  };
  for (const Case c : {Case{kSplitElements - 1, 1}, Case{kSplitElements, 1},
                       Case{3 * kSplitElements + 5, 1}, Case{2463, 512}, Case{7, 1 << 20}}) {
    for (const bool split : {true, false}) {
      SCOPED_TRACE(testing::Message() << c.n << " indices of cost " << c.index_cost
                                      << (split ? ", split" : ", on the caller"));
      std::vector<float> a = RandomValues(c.n, 3);
      const std::vector<float> before = a, ones(c.n, 1.0f);
      Launch<BinaryKernel<op::Add>>("test", cpu(), c.n, {a.data(), a.data(), ones.data()}, split,
                                    c.index_cost);
      for (int64_t i = 0; i < c.n; ++i) ASSERT_EQ(a[i], before[i] + 1.0f) << "index " << i;
    }
  }
}

TEST(BroadcastKernel, ElementByElementMatchesWholeRangesForEveryShapePair) {
  const std::vector<std::pair<Shape, Shape>> cases = {
      {{2, 3}, {2, 3}}, {{2, 3}, {3}},       {{2, 3}, {2, 1}},    {{4, 1, 3}, {1, 5, 1}},
      {{1}, {7}},       {{}, {2, 2}},        {{3, 1, 2, 1}, {4, 1, 5}}, {{1, 1}, {1, 1}}};
  for (const auto& [sa, sb] : cases) {
    const Shape out = BroadcastShape("test", sa, sb);
    const std::vector<float> a = RandomValues(sa.Size(), 1), b = RandomValues(sb.Size(), 2);
    std::vector<float> whole(out.Size()), split(out.Size());
    const BroadcastIndex ix = MakeBroadcastIndex("test", out, sa, sb);
    using K = BroadcastKernel<op::Sub>;
    ExpectSplitsAgree<K>(out.Size(), {whole.data(), a.data(), b.data(), ix},
                         {split.data(), a.data(), b.data(), ix}, whole, split);
    // And both are a - b read through NumPy's rules.
    const std::vector<int64_t> ta = BroadcastStrides(sa, out), tb = BroadcastStrides(sb, out);
    for (int64_t i = 0; i < out.Size(); ++i) {
      int64_t rest = i, oa = 0, ob = 0;
      for (int d = out.ndim() - 1; d >= 0; --d) {
        oa += rest % out[d] * ta[d];
        ob += rest % out[d] * tb[d];
        rest /= out[d];
      }
      ASSERT_FLOAT_EQ(whole[i], a[oa] - b[ob]) << sa.ToString() << " - " << sb.ToString() << " at " << i;
    }
  }
}

TEST(BroadcastKernel, ShapesBeyondTheLimitAreRefusedNamingTheOperation) {
  const Shape big{1, 1, 1, 1, 1, 1, 1, 1, 2};
  try {
    MakeBroadcastIndex("broadcast_add", big, big, Shape{2});
    FAIL() << "accepted 9 dimensions";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("broadcast_add"));
    EXPECT_THAT(e.what(), ::testing::HasSubstr("at most 8"));
  }
}

TEST(RandomKernels, ElementByElementMatchesWholeRanges) {
  const int64_t n = 1001;
  std::vector<float> whole(n), split(n);
  ExpectSplitsAgree<UniformKernel>(n, {whole.data(), 42, -2, 3}, {split.data(), 42, -2, 3},
                                   whole, split);
  for (float x : whole) ASSERT_TRUE(x >= -2 && x < 3) << x;
  ExpectSplitsAgree<NormalKernel>(n, {whole.data(), 7, 1, 2}, {split.data(), 7, 1, 2}, whole,
                                  split);
  double sum = 0;
  for (float x : whole) sum += x;
  EXPECT_NEAR(sum / n, 1.0, 0.2);
}

// The operators' kernels of ndarray/nn_kernels.h whose elements are not
// independent of their index's neighbours (shared dropout draws, softmax
// rows, per-channel sums), split as the GPU splits them.
TEST(OperatorKernels, ElementByElementMatchesWholeRanges) {
  const Shape data{3, 4, 5};
  const int64_t n = data.Size();
  const std::vector<float> x = RandomValues(n, 1), g = RandomValues(n, 2);
  {  // Dropout sharing one draw along axis 1.
    std::vector<float> whole(2 * n), split(2 * n);
    const BroadcastIndex ix = MakeBroadcastIndex("Dropout", data, Shape{3, 1, 5}, Shape{3, 1, 5});
    using K = DropoutKernel;
    ExpectSplitsAgree<K>(n, {whole.data(), whole.data() + n, x.data(), ix, 9, 0.5f, 2.0f, false},
                         {split.data(), split.data() + n, x.data(), ix, 9, 0.5f, 2.0f, false},
                         whole, split);
    int kept = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float mask = whole[n + i];
      ASSERT_TRUE(mask == 0.0f || mask == 2.0f) << mask;
      ASSERT_EQ(mask, whole[n + i % 5 + (i / 20) * 20]) << "not shared along axis 1 at " << i;
      kept += mask > 0;
    }
    EXPECT_GT(kept, 0);
    EXPECT_LT(kept, n);
  }
  {  // Softmax over axis 1 at every position, and its gradient.
    std::vector<float> whole(n), split(n);
    ExpectSplitsAgree<SoftmaxStridedKernel>(15, {whole.data(), x.data(), 4, 5, false},
                                            {split.data(), x.data(), 4, 5, false}, whole, split);
    EXPECT_NEAR(whole[0] + whole[5] + whole[10] + whole[15], 1.0f, 1e-6f);
    std::vector<float> gw(n), gs(n);
    ExpectSplitsAgree<SoftmaxStridedGradKernel>(15, {gw.data(), g.data(), whole.data(), 4, 5, false},
                                                {gs.data(), g.data(), whole.data(), 4, 5, false},
                                                gw, gs);
  }
  {  // Embedding's weight gradient, one index per column; indices repeat.
    const std::vector<float> index = {2, 0, 2, 9, -1};  // 9 and -1 clip to rows 3 and 0
    std::vector<float> whole(4 * 3, 0.0f), split(4 * 3, 0.0f);
    ExpectSplitsAgree<EmbeddingGradKernel>(3, {whole.data(), index.data(), g.data(), 5, 4, 3},
                                           {split.data(), index.data(), g.data(), 5, 4, 3},
                                           whole, split);
    EXPECT_FLOAT_EQ(whole[2 * 3 + 1], g[0 * 3 + 1] + g[2 * 3 + 1]);
    EXPECT_FLOAT_EQ(whole[0 * 3 + 2], g[1 * 3 + 2] + g[4 * 3 + 2]);
    EXPECT_FLOAT_EQ(whole[3 * 3 + 0], g[3 * 3 + 0]);
    EXPECT_FLOAT_EQ(whole[1 * 3 + 0], 0.0f);
  }
  {  // Concat's strided rows and transpose's gather, in runs.
    std::vector<float> whole(n, 0.0f), split(n, 0.0f);
    ExpectSplitsAgree<StridedCopyKernel>(3 * 7, {whole.data() + 2, x.data(), 7, 20, 7, false},
                                         {split.data() + 2, x.data(), 7, 20, 7, false}, whole,
                                         split);
    EXPECT_EQ(whole[20 + 2 + 3], x[7 + 3]);
    BroadcastIndex ix = MakeBroadcastIndex("transpose", Shape{5, 3, 4}, Shape{5, 3, 4},
                                           Shape{5, 3, 4});
    ix.sa[0] = 1;   // output (5, 3, 4) from data (3, 4, 5): axes (2, 0, 1)
    ix.sa[1] = 20;
    ix.sa[2] = 5;
    ExpectSplitsAgree<GatherKernel>(n, {whole.data(), x.data(), ix, false},
                                    {split.data(), x.data(), ix, false}, whole, split);
    EXPECT_EQ(whole[(4 * 3 + 2) * 4 + 1], x[(2 * 4 + 1) * 5 + 4]);
  }
  {  // The gradient of a (3, 1, 5) operand broadcast against (1, 4, 5).
    const Shape full{3, 4, 5}, left{3, 1, 5}, right{1, 4, 5};
    const std::vector<float> a = RandomValues(15, 3), b = RandomValues(20, 4);
    using K = ReduceBroadcastKernel<op::Mul>;
    K::Params whole_p{}, split_p{};
    MakeReductionIndices("test", full, left, right, &whole_p.outer, &whole_p.inner);
    std::vector<float> whole(15), split(15);
    whole_p.out = whole.data();
    whole_p.g = g.data();
    whole_p.self = a.data();
    whole_p.other = b.data();
    whole_p.scale = 1.0f;
    whole_p.for_a = true;
    split_p = whole_p;
    split_p.out = split.data();
    ExpectSplitsAgree<K>(15, whole_p, split_p, whole, split);
    // d(a * b)/da summed over the broadcast axis: sum_j g[i, j, k] * b[j, k].
    double want = 0;
    for (int j = 0; j < 4; ++j) want += double(g[(2 * 4 + j) * 5 + 3]) * b[j * 5 + 3];
    EXPECT_NEAR(whole[2 * 5 + 3], want, 1e-5);
  }
  {  // PReLU's gamma gradient, one index per channel.
    std::vector<float> whole(4), split(4);
    ExpectSplitsAgree<PreluGammaGradKernel>(4, {whole.data(), g.data(), x.data(), n, 4, 5, false},
                                            {split.data(), g.data(), x.data(), n, 4, 5, false},
                                            whole, split);
    double want = 0;  // channel 2
    for (int64_t i = 0; i < n; ++i) {
      if ((i / 5) % 4 == 2 && x[i] <= 0) want += double(g[i]) * x[i];
    }
    EXPECT_NEAR(whole[2], want, 1e-5);
  }
}

// BatchNorm's sums in slices (one index per channel and slice; slices cross
// the runs of `inner` elements) combine to the channel's whole sums, and
// the moments of slices to the channel's mean and variance.
TEST(OperatorKernels, BatchNormSlicesSumToTheChannelSums) {
  const BnLayout l{21, 2, 100};  // 2100 elements per channel
  const int64_t n = l.outer * l.channels * l.inner, parts = 5;
  std::vector<float> x = RandomValues(n, 5);
  for (float& v : x) v = v * 0.5f + 3.0f;  // a mean far from 0, as one-pass sums dislike
  const std::vector<float> g = RandomValues(n, 6);
  const std::vector<float> center = {0.25f, -0.5f};
  for (BnSum what : {kBnMoments, kBnSumGrad}) {
    std::vector<double> whole(2 * l.channels * parts), split(whole.size());
    BnPartsKernel::Params wp{whole.data(), x.data(), g.data(), center.data(), l, parts, what};
    BnPartsKernel::Params sp = wp;
    sp.partials = split.data();
    BnPartsKernel::MapRange(0, l.channels * parts, wp);
    for (int64_t j = 0; j < l.channels * parts; ++j) BnPartsKernel::MapRange(j, j + 1, sp);
    EXPECT_EQ(whole, split);
    std::vector<float> table(kBnColumns * l.channels);
    BnMomentsKernel::MapRange(0, l.channels, {table.data(), whole.data(), l, parts});
    for (int64_t c = 0; c < l.channels; ++c) {
      double sum = 0, sum_g = 0, dot = 0;
      for (int64_t o = 0; o < l.outer; ++o) {
        for (int64_t i = 0; i < l.inner; ++i) {
          const int64_t k = (o * l.channels + c) * l.inner + i;
          sum += x[k];
          sum_g += g[k];
          dot += g[k] * (double(x[k]) - center[c]);
        }
      }
      const double per_channel = static_cast<double>(l.PerChannel());
      if (what == kBnSumGrad) {
        EXPECT_NEAR(BnCombine(whole.data(), c, parts, false), sum_g, 1e-6 * (1 + std::fabs(sum_g)));
        EXPECT_NEAR(BnCombine(whole.data(), c, parts, true), dot, 1e-6 * (1 + std::fabs(dot)));
        continue;
      }
      const double mean = sum / per_channel;
      double squares = 0;
      for (int64_t o = 0; o < l.outer; ++o) {
        for (int64_t i = 0; i < l.inner; ++i) {
          const double d = x[(o * l.channels + c) * l.inner + i] - mean;
          squares += d * d;
        }
      }
      EXPECT_NEAR(BnCombine(whole.data(), c, parts, false), sum, 1e-9 * std::fabs(sum));
      EXPECT_FLOAT_EQ(table[kBnMean * l.channels + c], static_cast<float>(mean));
      EXPECT_FLOAT_EQ(table[kBnVar * l.channels + c], static_cast<float>(squares / per_channel));
    }
  }
}

// The GPU reduces an axis in strided parts that Combine joins; any grouping
// must give what the CPU's sequential loop gives (up to rounding for sums).
template <typename R>
void ExpectCombinedPartsAgree(const std::vector<float>& x) {
  double sequential = R::Init();
  for (float v : x) sequential = R::Reduce(sequential, v);
  std::vector<double> parts(4, R::Init());
  for (size_t i = 0; i < x.size(); ++i) parts[i % 4] = R::Reduce(parts[i % 4], x[i]);
  const double combined = R::Combine(R::Combine(parts[0], parts[1]), R::Combine(parts[2], parts[3]));
  EXPECT_NEAR(R::Finalize(combined, x.size()), R::Finalize(sequential, x.size()), 1e-5);
}

TEST(Reducers, PartsCombinedAsOnTheGpuMatchTheSequentialResult) {
  const std::vector<float> x = RandomValues(103, 3);
  ExpectCombinedPartsAgree<SumReducer>(x);
  ExpectCombinedPartsAgree<MeanReducer>(x);
  ExpectCombinedPartsAgree<NormReducer>(x);
  ExpectCombinedPartsAgree<MaxReducer>(x);
  ExpectCombinedPartsAgree<MinReducer>(x);
}

TEST(Reducers, AnAxisReductionOnTheCpuReducesTheMiddleAxis) {
  // (outer=2, n=3, inner=2)
  const std::vector<float> x = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
  std::vector<float> out(4);
  Reduce<SumReducer>("sum", cpu(), x.data(), out.data(), 2, 3, 2);
  EXPECT_THAT(out, ElementsAre(9, 12, 27, 30));
  Reduce<MaxReducer>("max", cpu(), x.data(), out.data(), 2, 3, 2);
  EXPECT_THAT(out, ElementsAre(5, 6, 11, 12));
  Reduce<MeanReducer>("mean", cpu(), x.data(), out.data(), 2, 0, 2);
  EXPECT_TRUE(std::isnan(out[0]));
}

// The row-major -> column-major mapping that cuBLAS calls use, run through
// cblas in column-major mode against cblas in row-major mode.
TEST(RowMajorAsColMajor, GivesTheRowMajorProductThroughAColumnMajorBlas) {
  const int64_t m = 5, n = 3, k = 4;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      const std::vector<float> a = RandomValues(m * k, 4), b = RandomValues(k * n, 5);
      const int64_t lda = ta ? m : k, ldb = tb ? k : n;
      std::vector<float> want(m * n), got(m * n, 1.0f);
      cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                  m, n, k, 1.0f, a.data(), lda, b.data(), ldb, 0.0f, want.data(), n);
      const ColMajorGemm g =
          RowMajorAsColMajor(ta, tb, m, n, k, a.data(), lda, b.data(), ldb, got.data(), n);
      cblas_sgemm(CblasColMajor, g.trans_first ? CblasTrans : CblasNoTrans,
                  g.trans_second ? CblasTrans : CblasNoTrans, g.m, g.n, g.k, 1.0f, g.first,
                  g.ld_first, g.second, g.ld_second, 0.0f, g.c, g.ldc);
      EXPECT_THAT(got, Pointwise(FloatEq(), want)) << "ta=" << ta << " tb=" << tb;
    }
  }
}

}  // namespace
}  // namespace mx::kernel
