// The examples of the MXNet.jl overview's "Symbols and Composition", "Shape
// Inference" and "Binding and Executing" sections, in row-major C++.
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

Symbol Mlp() {
  Symbol net = Variable("data");
  net = Op("FullyConnected", {net}, {{"num_hidden", 128}}, "fc1");
  net = Op("Activation", {net}, {{"act_type", "relu"}}, "relu1");
  net = Op("FullyConnected", {net}, {{"num_hidden", 64}}, "fc2");
  return Op("SoftmaxOutput", {net}, {}, "out");
}

TEST(SeedSymbols, PlusPrintsLikeTheSeed) {
  NameScope scope;
  Symbol a = Variable("A");
  Symbol b = Variable("B");
  Symbol c = a + b;
  EXPECT_EQ(c.name(), "_plus0");
  EXPECT_EQ(c.DebugString(),
            "Symbol Outputs:\n"
            "\toutput[0]=_plus0(0)\n"
            "Variable:A\n"
            "Variable:B\n"
            "--------------------\n"
            "Op:elemwise_add, Name=_plus0\n"
            "Inputs:\n"
            "\targ[0]=A(0) version=0\n"
            "\targ[1]=B(0) version=0\n");
}

TEST(SeedSymbols, MlpPrintListsEveryNodeInOrder) {
  EXPECT_EQ(Mlp().DebugString(),
            "Symbol Outputs:\n\toutput[0]=out(0)\n"
            "Variable:data\nVariable:fc1_weight\nVariable:fc1_bias\n"
            "--------------------\nOp:FullyConnected, Name=fc1\n"
            "Inputs:\n\targ[0]=data(0) version=0\n"
            "\targ[1]=fc1_weight(0) version=0\n"
            "\targ[2]=fc1_bias(0) version=0\n"
            "Attrs:\n\tnum_hidden=128\n"
            "--------------------\nOp:Activation, Name=relu1\nInputs:\n\targ[0]=fc1(0)\n"
            "Attrs:\n\tact_type=relu\n"
            "Variable:fc2_weight\nVariable:fc2_bias\n"
            "--------------------\nOp:FullyConnected, Name=fc2\n"
            "Inputs:\n\targ[0]=relu1(0)\n"
            "\targ[1]=fc2_weight(0) version=0\n"
            "\targ[2]=fc2_bias(0) version=0\n"
            "Attrs:\n\tnum_hidden=64\n"
            "Variable:out_label\n--------------------\n"
            "Op:SoftmaxOutput, Name=out\nInputs:\n"
            "\targ[0]=fc2(0)\n\targ[1]=out_label(0) version=0\n");
}

TEST(SeedSymbols, MlpListArguments) {
  EXPECT_THAT(Mlp().ListArguments(),
              ElementsAre("data", "fc1_weight", "fc1_bias", "fc2_weight",
                          "fc2_bias", "out_label"));
  EXPECT_THAT(Mlp().ListOutputs(), ElementsAre("out_output"));
  EXPECT_TRUE(Mlp().ListAuxiliaryStates().empty());
}

TEST(SeedSymbols, ExplicitWeightVariable) {
  Symbol net = Variable("data");
  Symbol w = Variable("myweight");
  net = Op("FullyConnected", {net, {"weight", w}}, {{"num_hidden", 128}}, "fc1");
  EXPECT_EQ(net.name(), "fc1");
  EXPECT_THAT(net.ListArguments(), ElementsAre("data", "myweight", "fc1_bias"));
}

TEST(SeedSymbols, ComposeReplacesAnArgument) {
  Symbol net = Variable("data");
  net = Op("FullyConnected", {net}, {{"num_hidden", 128}}, "fc1");
  Symbol net2 = Variable("data2");
  net2 = Op("FullyConnected", {net2}, {{"num_hidden", 128}}, "net2");
  EXPECT_THAT(net2.ListArguments(), ElementsAre("data2", "net2_weight", "net2_bias"));
  Symbol composed = net2({{"data2", net}}, "composed");
  EXPECT_EQ(composed.name(), "composed");
  EXPECT_THAT(composed.ListArguments(),
              ElementsAre("data", "fc1_weight", "fc1_bias", "net2_weight", "net2_bias"));
  // The original symbol is unchanged.
  EXPECT_THAT(net2.ListArguments(), ElementsAre("data2", "net2_weight", "net2_bias"));
  EXPECT_EQ(net2.name(), "net2");
  // Data flows through: net's 128 outputs are net2's inputs.
  auto shapes = composed.InferShape({{"data", Shape{4, 10}}});
  ASSERT_TRUE(shapes.ok()) << shapes.status();
  EXPECT_EQ(shapes->arguments[3], (Shape{128, 128}));  // net2_weight
  EXPECT_THAT(shapes->outputs, ElementsAre(Shape{4, 128}));
}

TEST(SeedShapeInference, FullyConnectedRowMajor) {
  Symbol net = Variable("data");
  net = Op("FullyConnected", {net}, {{"num_hidden", 10}}, "fc1");
  auto shapes = net.InferShape({{"data", Shape{64, 10}}});
  ASSERT_TRUE(shapes.ok()) << shapes.status();
  EXPECT_THAT(shapes->arguments,
              ElementsAre(Shape{64, 10}, Shape{10, 10}, Shape{10}));
  EXPECT_THAT(shapes->outputs, ElementsAre(Shape{64, 10}));
  EXPECT_TRUE(shapes->aux_states.empty());
  EXPECT_THAT(net.ListOutputs(), ElementsAre("fc1_output"));
  // (num_hidden, inputs), which the seed's square case cannot tell apart.
  shapes = net.InferShape({{"data", Shape{64, 20}}});
  ASSERT_TRUE(shapes.ok()) << shapes.status();
  EXPECT_THAT(shapes->arguments, ElementsAre(Shape{64, 20}, Shape{10, 20}, Shape{10}));
  EXPECT_THAT(shapes->outputs, ElementsAre(Shape{64, 10}));
}

TEST(SeedBinding, ElementwiseMultiplyForward) {
  NameScope scope;
  Symbol a = Variable("A");
  Symbol b = Variable("B");
  Symbol c = a * b;
  EXPECT_EQ(c.name(), "_mul0");  // the seed's "SymbolicNode _mul0"
  EXPECT_THAT(c.DebugString(), HasSubstr("Op:elemwise_mul, Name=_mul0\n"));
  NDArray av = Ones({3}) * 4;
  NDArray bv = Ones({3}) * 2;
  auto exec = Executor::Bind(c, cpu(), {{"A", av}, {"B", bv}});
  ASSERT_TRUE(exec.ok()) << exec.status();
  (*exec)->Forward();
  ASSERT_EQ((*exec)->outputs().size(), 1u);
  EXPECT_THAT((*exec)->outputs()[0].ToVector(), ElementsAre(8, 8, 8));
}

TEST(SeedBinding, SimpleBindAllocatesFromInputShapes) {
  auto exec = Executor::SimpleBind(Mlp(), cpu(), {{"data", Shape{100, 784}}});
  ASSERT_TRUE(exec.ok()) << exec.status();
  const auto& args = (*exec)->arg_dict();
  EXPECT_EQ(args.at("fc1_weight").shape(), (Shape{128, 784}));
  EXPECT_EQ(args.at("fc2_bias").shape(), (Shape{64}));
  EXPECT_EQ(args.at("out_label").shape(), (Shape{100}));
  (*exec)->Forward();
  // Zero weights give a uniform softmax.
  std::vector<float> out = (*exec)->outputs()[0].ToVector();
  ASSERT_EQ(out.size(), 100u * 64);
  EXPECT_FLOAT_EQ(out[0], 1.0f / 64);
}

}  // namespace
}  // namespace mx
