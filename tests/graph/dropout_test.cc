// Dropout in training: the kept fraction and scaling, the backward reusing
// its forward's mask, seeds, modes, shared axes, and the symbol's interface.
// (Inference and p = 0 are in the operator table, op_cases_nn.cc.)
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
using ::testing::HasSubstr;

// Binds `net` (one argument, "x") to x, with its gradient.
std::unique_ptr<Executor> BindX(const Symbol& net, const std::vector<float>& x,
                                const Shape& shape) {
  auto exec = Executor::Bind(net, cpu(), {{"x", FromVector(x, shape)}},
                             {{"x", Zeros(shape)}});
  EXPECT_TRUE(exec.ok()) << exec.status();
  return *std::move(exec);
}

Symbol Dropout(const Symbol& data, Params params) {
  return Op("Dropout", {data}, params);
}

TEST(DropoutTraining, KeepsAboutOneMinusPAndScalesByItsInverse) {
  const Shape shape{100, 100};
  auto exec = BindX(Dropout(Variable("x"), {{"p", 0.3f}}), std::vector<float>(10000, 1.0f),
                    shape);
  exec->Forward(true);
  std::vector<float> y = exec->outputs()[0].ToVector();
  int kept = 0;
  for (float v : y) {
    if (v != 0) {
      ++kept;
      EXPECT_FLOAT_EQ(v, 1.0f / 0.7f);
    }
  }
  // 10000 draws: the standard deviation of the fraction is 0.0046.
  EXPECT_NEAR(kept / 10000.0, 0.7, 0.02);
}

TEST(DropoutTraining, BackwardUsesTheMaskOfItsForward) {
  const Shape shape{20, 30};
  std::vector<float> x(600);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.5f + (i % 7) * 0.1f;
  auto exec = BindX(Dropout(Variable("x"), {{"p", 0.5f}}), x, shape);
  exec->Forward(true);
  exec->Backward({Ones(shape)});
  std::vector<float> y = exec->outputs()[0].ToVector();
  std::vector<float> g = exec->grad_dict().at("x").ToVector();
  for (size_t i = 0; i < x.size(); ++i) {
    ASSERT_FLOAT_EQ(g[i], y[i] / x[i]) << "element " << i;
  }
}

TEST(DropoutTraining, TwoDropoutsInAChainEachReuseTheirOwnMask) {
  const Shape shape{10, 40};
  std::vector<float> x(400, 2.0f);
  Symbol net = Dropout(Dropout(Variable("x"), {{"p", 0.5f}}), {{"p", 0.5f}});
  auto exec = BindX(net, x, shape);
  exec->Forward(true);
  exec->Backward({Ones(shape)});
  std::vector<float> y = exec->outputs()[0].ToVector();
  std::vector<float> g = exec->grad_dict().at("x").ToVector();
  int kept = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    ASSERT_FLOAT_EQ(g[i], y[i] / x[i]) << "element " << i;
    kept += y[i] != 0;
  }
  EXPECT_NEAR(kept / 400.0, 0.25, 0.1);
}

TEST(DropoutTraining, EveryForwardDrawsAFreshMask) {
  const Shape shape{50, 20};
  auto exec = BindX(Dropout(Variable("x"), {}), std::vector<float>(1000, 1.0f), shape);
  exec->Forward(true);
  std::vector<float> first = exec->outputs()[0].ToVector();
  exec->Forward(true);
  EXPECT_NE(exec->outputs()[0].ToVector(), first);
}

TEST(DropoutTraining, TheSameSeedGivesTheSameMask) {
  const Shape shape{50, 20};
  auto exec = BindX(Dropout(Variable("x"), {}), std::vector<float>(1000, 1.0f), shape);
  srand(42);
  exec->Forward(true);
  std::vector<float> first = exec->outputs()[0].ToVector();
  srand(42);
  exec->Forward(true);
  EXPECT_EQ(exec->outputs()[0].ToVector(), first);
}

TEST(DropoutTraining, SharedAxesDropWholeRows) {
  const Shape shape{200, 8};
  auto exec = BindX(Dropout(Variable("x"), {{"p", 0.5f}, {"axes", Shape{1}}}),
                    std::vector<float>(1600, 1.0f), shape);
  exec->Forward(true);
  std::vector<float> y = exec->outputs()[0].ToVector();
  int kept_rows = 0;
  for (int r = 0; r < 200; ++r) {
    for (int c = 1; c < 8; ++c) ASSERT_EQ(y[r * 8 + c], y[r * 8]) << "row " << r;
    kept_rows += y[r * 8] != 0;
  }
  EXPECT_GT(kept_rows, 60);
  EXPECT_LT(kept_rows, 140);
}

TEST(DropoutTraining, POneDropsEverything) {
  const Shape shape{4, 5};
  auto exec = BindX(Dropout(Variable("x"), {{"p", 1.0f}}), std::vector<float>(20, 1.0f),
                    shape);
  exec->Forward(true);
  exec->Backward({Ones(shape)});
  EXPECT_EQ(exec->outputs()[0].ToVector(), std::vector<float>(20, 0.0f));
  EXPECT_EQ(exec->grad_dict().at("x").ToVector(), std::vector<float>(20, 0.0f));
}

TEST(DropoutInference, IsTheIdentityInTrainingMode) {
  const Shape shape{3, 4};
  std::vector<float> x(12);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i) - 5;
  auto exec = BindX(Dropout(Variable("x"), {{"p", 0.9f}}), x, shape);
  exec->Forward(false);
  EXPECT_EQ(exec->outputs()[0].ToVector(), x);
}

TEST(DropoutInference, ModeAlwaysDropsAtInferenceToo) {
  const Shape shape{100, 10};
  auto exec = BindX(Dropout(Variable("x"), {{"p", 0.5f}, {"mode", "always"}}),
                    std::vector<float>(1000, 1.0f), shape);
  exec->Forward(false);
  int dropped = 0;
  for (float v : exec->outputs()[0].ToVector()) dropped += v == 0;
  EXPECT_GT(dropped, 400);
  EXPECT_LT(dropped, 600);
}

TEST(DropoutSymbol, HasOneVisibleOutputAndComposes) {
  NameScope scope;
  Symbol net = Dropout(Variable("data"), {});
  EXPECT_THAT(net.ListOutputs(), ElementsAre("dropout0_output"));
  net = Op("FullyConnected", {net}, {{"num_hidden", 3}});
  EXPECT_THAT(net.ListArguments(),
              ElementsAre("data", "fullyconnected0_weight", "fullyconnected0_bias"));
}

TEST(DropoutSymbol, ProbabilityOutsideZeroOneIsAnError) {
  Symbol net = Dropout(Variable("data"), {{"p", 1.5f}});
  auto shapes = net.InferShape({{"data", Shape{2, 3}}});
  ASSERT_FALSE(shapes.ok());
  EXPECT_THAT(shapes.status().message(), HasSubstr("p=1.5"));
}

TEST(DropoutSymbol, AxisOutOfRangeIsAnError) {
  Symbol net = Dropout(Variable("data"), {{"axes", Shape{2}}});
  auto shapes = net.InferShape({{"data", Shape{2, 3}}});
  ASSERT_FALSE(shapes.ok());
  EXPECT_THAT(shapes.status().message(), HasSubstr("axis 2 is out of range"));
}

}  // namespace
}  // namespace mx
