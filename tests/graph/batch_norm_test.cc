// BatchNorm beyond the operator table: the moving averages (updated by a
// training forward only, not with use_global_stats), the listings, and
// shape inference.
#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "graph/executor.h"
#include "graph/symbol.h"
#include "gtest/gtest.h"

namespace mx {
namespace {

using ::testing::ElementsAre;
using ::testing::FloatNear;
using ::testing::HasSubstr;
using ::testing::Pointwise;

// data (4, 2): channel 0 holds 1, 2, 3, 4 (mean 2.5, variance 1.25),
// channel 1 holds 0, 0, 2, 2 (mean 1, variance 1).
const std::vector<float> kData = {1, 0, 2, 0, 3, 2, 4, 2};

struct Bound {
  std::unique_ptr<Executor> exec;
  NDArray moving_mean, moving_var;
};

Bound BindBn(Params params) {
  NameScope scope;
  Symbol net = Op("BatchNorm", {Variable("data")}, params, "bn");
  Bound b;
  b.moving_mean = FromVector({0.5f, -1.0f}, Shape{2});
  b.moving_var = FromVector({2.0f, 4.0f}, Shape{2});
  auto exec = Executor::Bind(
      net, cpu(),
      {{"data", FromVector(kData, Shape{4, 2})},
       {"bn_gamma", FromVector({1.5f, 0.5f}, Shape{2})},
       {"bn_beta", FromVector({0.1f, -0.2f}, Shape{2})}},
      {}, {},
      {{"bn_moving_mean", b.moving_mean}, {"bn_moving_var", b.moving_var}});
  EXPECT_TRUE(exec.ok()) << exec.status();
  b.exec = *std::move(exec);
  return b;
}

TEST(BatchNormMovingStats, TrainingForwardBlendsInTheBatchStatistics) {
  Bound b = BindBn({{"momentum", 0.8f}});
  b.exec->Forward(true);
  // moving = moving * 0.8 + batch * 0.2
  const std::vector<float> mean = {0.5f * 0.8f + 2.5f * 0.2f, -1.0f * 0.8f + 1.0f * 0.2f};
  const std::vector<float> var = {2.0f * 0.8f + 1.25f * 0.2f, 4.0f * 0.8f + 1.0f * 0.2f};
  EXPECT_THAT(b.moving_mean.ToVector(), Pointwise(FloatNear(1e-6), mean));
  EXPECT_THAT(b.moving_var.ToVector(), Pointwise(FloatNear(1e-6), var));
}

TEST(BatchNormMovingStats, InferenceUsesThemAndLeavesThemAlone) {
  Bound b = BindBn({{"fix_gamma", false}});
  b.exec->Forward(false);
  EXPECT_THAT(b.moving_mean.ToVector(), ElementsAre(0.5f, -1.0f));
  EXPECT_THAT(b.moving_var.ToVector(), ElementsAre(2.0f, 4.0f));
  std::vector<float> y = b.exec->outputs()[0].ToVector();
  // Element 0: channel 0, x = 1.
  EXPECT_NEAR(y[0], (1 - 0.5) / std::sqrt(2.0 + 1e-3) * 1.5 + 0.1, 1e-5);
  // Element 1: channel 1, x = 0.
  EXPECT_NEAR(y[1], (0 + 1.0) / std::sqrt(4.0 + 1e-3) * 0.5 - 0.2, 1e-5);
}

TEST(BatchNormMovingStats, GlobalStatsInTrainingLeaveThemAlone) {
  Bound b = BindBn({{"use_global_stats", true}});
  b.exec->Forward(true);
  EXPECT_THAT(b.moving_mean.ToVector(), ElementsAre(0.5f, -1.0f));
  EXPECT_THAT(b.moving_var.ToVector(), ElementsAre(2.0f, 4.0f));
}

TEST(BatchNormOutputs, MeanAndVarAreTheBatchStatisticsInTraining) {
  Bound b = BindBn({{"output_mean_var", true}});
  b.exec->Forward(true);
  ASSERT_EQ(b.exec->outputs().size(), 3u);
  EXPECT_THAT(b.exec->outputs()[1].ToVector(),
              Pointwise(FloatNear(1e-6), std::vector<float>{2.5f, 1.0f}));
  EXPECT_THAT(b.exec->outputs()[2].ToVector(),
              Pointwise(FloatNear(1e-6), std::vector<float>{1.25f, 1.0f}));
}

// Channels of many elements (their sums are taken in slices, combined)
// against the textbook formulas in double: y = xhat * gamma + beta, and
// dx = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat)).
TEST(BatchNormLargeChannels, ForwardAndBackwardMatchTheFormulas) {
  NameScope scope;
  const int64_t N = 3, C = 2, H = 700, per = N * H;
  Symbol net = Op("BatchNorm", {Variable("data")}, {{"fix_gamma", false}, {"eps", 1e-5f}}, "bn");
  srand(4);
  NDArray data = RandomUniform(-2, 3, {N, C, H});
  NDArray gamma = FromVector({1.5f, 0.5f}), beta = FromVector({0.1f, -0.2f});
  NDArray head = RandomUniform(-1, 1, {N, C, H});
  NDArray gdata = Zeros({N, C, H}), ggamma = Zeros({C}), gbeta = Zeros({C});
  auto exec = Executor::Bind(net, cpu(), {{"data", data}, {"bn_gamma", gamma}, {"bn_beta", beta}},
                             {{"data", gdata}, {"bn_gamma", ggamma}, {"bn_beta", gbeta}}, {},
                             {{"bn_moving_mean", Zeros({C})}, {"bn_moving_var", Ones({C})}});
  ASSERT_TRUE(exec.ok()) << exec.status();
  (*exec)->Forward(true);
  (*exec)->Backward({head});
  const std::vector<float> x = data.ToVector(), g = head.ToVector();
  const std::vector<float> y = (*exec)->outputs()[0].ToVector(), dx = gdata.ToVector();
  const std::vector<float> w = gamma.ToVector(), b = beta.ToVector();
  for (int64_t c = 0; c < C; ++c) {
    auto at = [&](int64_t n, int64_t h) { return (n * C + c) * H + h; };
    double mean = 0, var = 0, mean_g = 0, mean_gx = 0;
    for (int64_t n = 0; n < N; ++n) for (int64_t h = 0; h < H; ++h) mean += x[at(n, h)];
    mean /= per;
    for (int64_t n = 0; n < N; ++n) for (int64_t h = 0; h < H; ++h) {
      var += (x[at(n, h)] - mean) * (x[at(n, h)] - mean);
    }
    var /= per;
    const double invstd = 1 / std::sqrt(var + 1e-5);
    for (int64_t n = 0; n < N; ++n) for (int64_t h = 0; h < H; ++h) {
      mean_g += g[at(n, h)];
      mean_gx += g[at(n, h)] * (x[at(n, h)] - mean) * invstd;
    }
    mean_g /= per;
    mean_gx /= per;
    for (int64_t n = 0; n < N; ++n) for (int64_t h = 0; h < H; ++h) {
      const double xhat = (x[at(n, h)] - mean) * invstd;
      ASSERT_NEAR(y[at(n, h)], xhat * w[c] + b[c], 1e-4) << "y at " << at(n, h);
      ASSERT_NEAR(dx[at(n, h)], w[c] * invstd * (g[at(n, h)] - mean_g - xhat * mean_gx), 1e-4)
          << "dx at " << at(n, h);
    }
    EXPECT_NEAR(gbeta.ToVector()[c], mean_g * per, 1e-3);
    EXPECT_NEAR(ggamma.ToVector()[c], mean_gx * per, 1e-3);
  }
}

TEST(BatchNormSymbol, ListsMXNetNames) {
  NameScope scope;
  Symbol net = Op("BatchNorm", {Variable("data")});
  EXPECT_THAT(net.ListArguments(), ElementsAre("data", "batchnorm0_gamma", "batchnorm0_beta"));
  EXPECT_THAT(net.ListAuxiliaryStates(),
              ElementsAre("batchnorm0_moving_mean", "batchnorm0_moving_var"));
  EXPECT_THAT(net.ListOutputs(), ElementsAre("batchnorm0_output"));
  Symbol with_stats = Op("BatchNorm", {Variable("data")}, {{"output_mean_var", true}}, "bn");
  EXPECT_THAT(with_stats.ListOutputs(), ElementsAre("bn_output", "bn_mean", "bn_var"));
}

TEST(BatchNormShapes, PerChannelArraysFollowTheAxis) {
  Symbol net = Op("BatchNorm", {Variable("data")}, {{"axis", -1}}, "bn");
  auto shapes = net.InferShape({{"data", Shape{2, 3, 5}}});
  ASSERT_TRUE(shapes.ok()) << shapes.status();
  EXPECT_THAT(shapes->arguments, ElementsAre(Shape{2, 3, 5}, Shape{5}, Shape{5}));
  EXPECT_THAT(shapes->aux_states, ElementsAre(Shape{5}, Shape{5}));
  EXPECT_THAT(shapes->outputs, ElementsAre(Shape{2, 3, 5}));
}

TEST(BatchNormShapes, GammaFillsAnUnknownChannelCount) {
  Symbol net = Op("BatchNorm", {Variable("data")}, {}, "bn");
  auto shapes = net.InferShape({{"data", Shape{4, 0, 2}}, {"bn_gamma", Shape{6}}});
  ASSERT_TRUE(shapes.ok()) << shapes.status();
  EXPECT_EQ(shapes->arguments[0], (Shape{4, 6, 2}));
  EXPECT_EQ(shapes->outputs[0], (Shape{4, 6, 2}));
}

TEST(BatchNormShapes, MismatchedGammaNamesBothShapes) {
  Symbol net = Op("BatchNorm", {Variable("data")}, {}, "bn");
  auto shapes = net.InferShape({{"data", Shape{4, 3}}, {"bn_gamma", Shape{5}}});
  ASSERT_FALSE(shapes.ok());
  EXPECT_THAT(shapes.status().message(), HasSubstr("gamma"));
  EXPECT_THAT(shapes.status().message(), HasSubstr("(5,)"));
  EXPECT_THAT(shapes.status().message(), HasSubstr("(3,)"));
}

TEST(BatchNormShapes, AxisOutOfRangeIsAnError) {
  Symbol net = Op("BatchNorm", {Variable("data")}, {{"axis", 2}}, "bn");
  auto shapes = net.InferShape({{"data", Shape{4, 3}}});
  ASSERT_FALSE(shapes.ok());
  EXPECT_THAT(shapes.status().message(), HasSubstr("axis 2 is out of range"));
}

}  // namespace
}  // namespace mx
