// Shape inference and parameter errors of LeakyReLU, the regression
// outputs, SoftmaxActivation, Embedding, dot, sum/mean and broadcast_*:
// partial shapes are completed where MXNet completes them, and every
// inconsistency names the input and the shapes.
#include <map>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "graph/symbol.h"
#include "gtest/gtest.h"

namespace mx {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

using ShapeMap = std::map<std::string, Shape>;

Symbol Unary(const std::string& op, Params params) {
  return Op(op, {Variable("data")}, params, "op");
}

Symbol Binary(const std::string& op, Params params = {}) {
  return Op(op, {Variable("a"), Variable("b")}, params, "op");
}

std::vector<Shape> OutputShapes(const Symbol& s, const ShapeMap& known) {
  auto shapes = s.InferShape(known);
  EXPECT_TRUE(shapes.ok()) << shapes.status();
  return shapes.ok() ? shapes->outputs : std::vector<Shape>{};
}

std::string Error(const Symbol& s, const ShapeMap& known) {
  auto shapes = s.InferShape(known);
  EXPECT_FALSE(shapes.ok());
  return shapes.ok() ? "" : std::string(shapes.status().message());
}

TEST(LeakyReLUShapes, PreluGammaIsOnePerChannel) {
  Symbol s = Unary("LeakyReLU", {{"act_type", "prelu"}});
  EXPECT_THAT(s.ListArguments(), ElementsAre("data", "op_gamma"));
  auto shapes = s.InferShape({{"data", Shape{2, 5, 3}}});
  ASSERT_TRUE(shapes.ok()) << shapes.status();
  EXPECT_EQ(shapes->arguments[1], Shape{5});
}

TEST(LeakyReLUShapes, RReLUIsUnimplemented) {
  auto shapes = Unary("LeakyReLU", {{"act_type", "rrelu"}}).InferShape({{"data", Shape{2, 3}}});
  ASSERT_FALSE(shapes.ok());
  EXPECT_EQ(shapes.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(shapes.status().message(), HasSubstr("rrelu"));
}

TEST(RegressionOutputShapes, ColumnDataTakesAVectorLabel) {
  Symbol s = Unary("LinearRegressionOutput", {});
  EXPECT_THAT(s.ListArguments(), ElementsAre("data", "op_label"));
  auto shapes = s.InferShape({{"data", Shape{8, 1}}});
  ASSERT_TRUE(shapes.ok()) << shapes.status();
  EXPECT_EQ(shapes->arguments[1], Shape{8});
  shapes = s.InferShape({{"data", Shape{8, 3}}});
  ASSERT_TRUE(shapes.ok()) << shapes.status();
  EXPECT_EQ(shapes->arguments[1], (Shape{8, 3}));
}

TEST(RegressionOutputShapes, LabelOfAnotherSizeIsAnError) {
  std::string msg = Error(Unary("MAERegressionOutput", {}),
                          {{"data", Shape{8, 3}}, {"op_label", Shape{8, 2}}});
  EXPECT_THAT(msg, HasSubstr("label has shape (8,2)"));
  EXPECT_THAT(msg, HasSubstr("(8,3)"));
}

TEST(SoftmaxActivationShapes, ChannelModeNeedsThreeDimensions) {
  std::string msg = Error(Unary("SoftmaxActivation", {{"mode", "channel"}}),
                          {{"data", Shape{2, 3}}});
  EXPECT_THAT(msg, HasSubstr("at least 3 dimensions"));
}

TEST(EmbeddingShapes, OutputAppendsOutputDim) {
  Symbol s = Unary("Embedding", {{"input_dim", 10}, {"output_dim", 4}});
  EXPECT_THAT(s.ListArguments(), ElementsAre("data", "op_weight"));
  auto shapes = s.InferShape({{"data", Shape{2, 7}}});
  ASSERT_TRUE(shapes.ok()) << shapes.status();
  EXPECT_EQ(shapes->arguments[1], (Shape{10, 4}));
  EXPECT_THAT(shapes->outputs, ElementsAre(Shape{2, 7, 4}));
}

TEST(EmbeddingShapes, WrongWeightIsNamed) {
  std::string msg = Error(Unary("Embedding", {{"input_dim", 10}, {"output_dim", 4}}),
                          {{"data", Shape{2}}, {"op_weight", Shape{10, 5}}});
  EXPECT_THAT(msg, HasSubstr("weight has shape (10,5)"));
}

TEST(DotShapes, FollowMXNetsRule) {
  EXPECT_THAT(OutputShapes(Binary("dot"), {{"a", Shape{3, 4}}, {"b", Shape{4, 5}}}),
              ElementsAre(Shape{3, 5}));
  EXPECT_THAT(OutputShapes(Binary("dot", {{"transpose_a", true}}),
                           {{"a", Shape{4, 3}}, {"b", Shape{4, 5}}}),
              ElementsAre(Shape{3, 5}));
  EXPECT_THAT(OutputShapes(Binary("dot"), {{"a", Shape{2, 3, 4}}, {"b", Shape{4, 5, 6}}}),
              ElementsAre(Shape{2, 3, 5, 6}));
  EXPECT_THAT(OutputShapes(Binary("dot"), {{"a", Shape{4}}, {"b", Shape{4}}}),
              ElementsAre(Shape{1}));
}

TEST(DotShapes, ContractedSizeIsCompletedFromTheOtherSide) {
  auto shapes = Binary("dot").InferShape({{"a", Shape{3, 4}}, {"b", Shape{0, 5}}});
  ASSERT_TRUE(shapes.ok()) << shapes.status();
  EXPECT_EQ(shapes->arguments[1], (Shape{4, 5}));
}

TEST(DotShapes, MismatchNamesBothShapes) {
  std::string msg = Error(Binary("dot"), {{"a", Shape{3, 4}}, {"b", Shape{5, 2}}});
  EXPECT_THAT(msg, HasSubstr("(3,4)"));
  EXPECT_THAT(msg, HasSubstr("(5,2)"));
}

TEST(ReduceShapes, AxisKeepdimsExclude) {
  const ShapeMap data = {{"data", Shape{2, 3, 4}}};
  EXPECT_THAT(OutputShapes(Unary("sum", {}), data), ElementsAre(Shape{1}));
  EXPECT_THAT(OutputShapes(Unary("sum", {{"keepdims", true}}), data),
              ElementsAre(Shape{1, 1, 1}));
  EXPECT_THAT(OutputShapes(Unary("mean", {{"axis", Shape{-1}}}), data),
              ElementsAre(Shape{2, 3}));
  EXPECT_THAT(OutputShapes(Unary("mean", {{"axis", Shape{1}}, {"exclude", true}}), data),
              ElementsAre(Shape{3}));
}

TEST(ReduceShapes, BadAxesAreErrors) {
  const ShapeMap data = {{"data", Shape{2, 3}}};
  EXPECT_THAT(Error(Unary("sum", {{"axis", Shape{2}}}), data), HasSubstr("axis 2 is out of range"));
  EXPECT_THAT(Error(Unary("sum", {{"axis", Shape{1, -1}}}), data), HasSubstr("twice"));
}

TEST(BroadcastShapes, NumPyRules) {
  EXPECT_THAT(OutputShapes(Binary("broadcast_add"), {{"a", Shape{2, 1, 4}}, {"b", Shape{3, 1}}}),
              ElementsAre(Shape{2, 3, 4}));
  EXPECT_THAT(OutputShapes(Binary("broadcast_mul"), {{"a", Shape{5}}, {"b", Shape{2, 5}}}),
              ElementsAre(Shape{2, 5}));
}

TEST(BroadcastShapes, IncompatibleShapesNameBoth) {
  std::string msg = Error(Binary("broadcast_sub"), {{"a", Shape{2, 3}}, {"b", Shape{4}}});
  EXPECT_THAT(msg, HasSubstr("(2,3)"));
  EXPECT_THAT(msg, HasSubstr("(4,)"));
  EXPECT_THAT(msg, HasSubstr("cannot be broadcast"));
}

}  // namespace
}  // namespace mx
