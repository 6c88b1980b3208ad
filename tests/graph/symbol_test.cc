// Symbol: names, operators, listings, attributes, shape inference, JSON
// (written in the 1.x layout, read in 1.x and 0.8 layouts), errors, Graphviz.
#include "graph/symbol.h"

#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "graph/executor.h"
#include "gtest/gtest.h"

namespace mx {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;

TEST(SymbolNames, AutomaticNamesCountPerOperatorWithinAScope) {
  NameScope scope;
  Symbol x = Variable("x");
  EXPECT_EQ(Op("FullyConnected", {x}, {{"num_hidden", 2}}).name(), "fullyconnected0");
  EXPECT_EQ(Op("FullyConnected", {x}, {{"num_hidden", 2}}).name(), "fullyconnected1");
  EXPECT_EQ((x + x).name(), "_plus0");
  EXPECT_EQ((x * 2.0f).name(), "_mulscalar0");
  {
    NameScope inner("block1_");
    EXPECT_EQ(Op("Activation", {x}, {{"act_type", "relu"}}).name(), "block1_activation0");
  }
  EXPECT_EQ(Op("Activation", {x}, {{"act_type", "relu"}}).name(), "activation0");
}

// An AttrScope's plain keys on an operator are stored hidden ("__stage__"):
// as plain keys they were written among the operator's parameters, so the
// file did not load ("unknown attribute 'stage'"), and a key named as a
// parameter ("p" over Dropout) replaced the parameter in the file.
TEST(SymbolAttrs, ScopeKeysOnOperatorsSurviveTheFileAndLeaveParametersAlone) {
  Symbol net;
  {
    AttrScope scope({{"stage", "a"}, {"p", "0.9"}});
    net = Op("Dropout", {Op("FullyConnected", {Variable("data")}, {{"num_hidden", 4}}, "fc")},
             {{"p", 0.25f}}, "drop");
  }
  absl::StatusOr<Symbol> loaded = Symbol::FromJSON(net.ToJSON());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->GetAttr("stage"), "a");
  EXPECT_EQ(loaded->GetAttr("p"), "0.9");  // the scope's attribute, hidden
  EXPECT_EQ(loaded->ToJSON(), net.ToJSON());
  EXPECT_THAT(net.ToJSON(), HasSubstr("\"p\": \"0.25\""));  // the parameter
}

// An operator's weight and bias, made for it, get the attributes a
// Variable made in the same scope gets ("stage" as given), and the
// operator's own (an lr_mult on the layer is its weight's and bias's).
// Before, they took the operator's stored keys: "__stage__" on fc_weight
// but "stage" on data.
TEST(SymbolAttrs, MadeVariablesGetTheScopesKeysAsVariablesDo) {
  Symbol net;
  {
    AttrScope scope({{"stage", "a"}, {"ctx_group", "dev1"}});
    net = Op("FullyConnected", {Variable("data")}, {{"num_hidden", 4}, {"lr_mult", "2"}}, "fc");
  }
  const std::map<std::string, std::string> attrs = net.ListAttrs();
  for (const char* var : {"data", "fc_weight", "fc_bias"}) {
    SCOPED_TRACE(var);
    EXPECT_EQ(attrs.at(absl::StrCat(var, "$stage")), "a");
    EXPECT_EQ(attrs.count(absl::StrCat(var, "$__stage__")), 0u);
    EXPECT_EQ(attrs.at(absl::StrCat(var, "$__ctx_group__")), "dev1");
  }
  EXPECT_EQ(attrs.at("fc_weight$__lr_mult__"), "2");
  EXPECT_EQ(attrs.at("fc_bias$__lr_mult__"), "2");
  EXPECT_EQ(attrs.count("data$__lr_mult__"), 0u);
  EXPECT_EQ(attrs.at("fc$__stage__"), "a");  // the operator's: hidden
}

// GetAttr finds a key as MXNet's attr() does: as given, or hidden.
TEST(SymbolAttrs, GetAttrFindsHiddenKeysByTheirNames) {
  Symbol w = Variable("w", {{"lr_mult", "2"}, {"mood", "calm"}});
  EXPECT_EQ(w.GetAttr("lr_mult"), "2");
  EXPECT_EQ(w.GetAttr("__lr_mult__"), "2");
  EXPECT_EQ(w.GetAttr("mood"), "calm");
  EXPECT_EQ(w.GetAttr("colour"), std::nullopt);
}

TEST(SymbolOps, UnknownOperatorIsAnError) {
  try {
    Op("NoSuchOp", {Variable("x")});
    FAIL();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("unknown operator 'NoSuchOp'"));
  }
}

TEST(SymbolOps, BadParametersNameOperatorAndParameter) {
  Symbol x = Variable("x");
  try {
    Op("FullyConnected", {x}, {{"num_hidden", "ten"}});
    FAIL();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("FullyConnected"));
    EXPECT_THAT(e.what(), HasSubstr("num_hidden"));
  }
  try {
    Op("FullyConnected", {x}, {{"num_hidden", 3}, {"num_hiden", 3}});
    FAIL();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("unknown parameter 'num_hiden'"));
  }
  try {
    Op("FullyConnected", {x});
    FAIL();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("required parameter 'num_hidden'"));
  }
  // Shapes as MXNet's tuples read them: "(3,3" and "(3,,3)" were taken for
  // (3,3), and Python 2's "(3L, 3L)" was refused.
  for (const char* bad : {"(3,3", "3,3", "(3,,3)", "(3,3]"}) {
    try {
      Op("Pooling", {x}, {{"kernel", bad}});
      FAIL() << bad;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(std::string("'") + bad + "' is not a shape"));
    }
  }
  for (const char* good : {"(3L, 3L)", "[3,3]", " (3, 3,) "}) {
    EXPECT_EQ(Op("Pooling", {x}, {{"kernel", good}}).InferShape({{"x", {1, 1, 5, 5}}})->outputs[0],
              Shape({1, 1, 3, 3}))
        << good;
  }
  // Not a shape error at bind (a (-3,784) weight) that names neither.
  try {
    Op("FullyConnected", {x}, {{"num_hidden", -3}});
    FAIL();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("parameter num_hidden='-3' is invalid: must be from 1"));
  }
  try {
    Op("Activation", {x}, {{"act_type", "swish"}});
    FAIL();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("act_type"));
    EXPECT_THAT(e.what(), HasSubstr("relu"));
  }
}

TEST(SymbolOps, WrongInputsAreErrors) {
  Symbol x = Variable("x");
  EXPECT_THROW(Op("Activation", {x, x}, {{"act_type", "relu"}}), Error);
  EXPECT_THROW(Op("FullyConnected", {{"wieght", x}}, {{"num_hidden", 2}}), Error);
}

// As in MXNet: a missing data input is a variable <node>_data, which
// composition fills in later (MXNet's test_symbol_compose).
TEST(SymbolOps, AMissingDataInputIsAVariableThatCompositionFills) {
  Symbol net1 = Op("FullyConnected", {Variable("data")}, {{"num_hidden", 10}}, "fc1");
  Symbol net2 = Op("FullyConnected", {}, {{"num_hidden", 10}}, "fc3");
  net2 = Op("Activation", {net2}, {{"act_type", "relu"}});
  net2 = Op("FullyConnected", {net2}, {{"num_hidden", 20}}, "fc4");
  EXPECT_THAT(net2.ListArguments(),
              ElementsAre("fc3_data", "fc3_weight", "fc3_bias", "fc4_weight", "fc4_bias"));
  Symbol composed = net2({{"fc3_data", net1}}, "composed");
  EXPECT_THAT(composed.ListArguments(), ElementsAre("data", "fc1_weight", "fc1_bias", "fc3_weight",
                                                    "fc3_bias", "fc4_weight", "fc4_bias"));
  auto shapes = composed.InferShape({{"data", Shape{4, 7}}});
  ASSERT_TRUE(shapes.ok()) << shapes.status();
  EXPECT_EQ(shapes->outputs[0], (Shape{4, 20}));
  EXPECT_THAT(Op("elemwise_add", {}, {}, "add").ListArguments(), ElementsAre("add_lhs", "add_rhs"));
}

TEST(SymbolOps, NoBiasDropsTheBiasArgument) {
  Symbol fc = Op("FullyConnected", {Variable("data")}, {{"num_hidden", 2}, {"no_bias", true}}, "fc");
  EXPECT_THAT(fc.ListArguments(), ElementsAre("data", "fc_weight"));
}

TEST(SymbolGroup, GroupAndSelectOutputs) {
  Symbol x = Variable("x");
  Symbol a = Op("Activation", {x}, {{"act_type", "relu"}}, "a");
  Symbol b = Op("Activation", {x}, {{"act_type", "tanh"}}, "b");
  Symbol g = Group({a, b});
  EXPECT_THAT(g.ListOutputs(), ElementsAre("a_output", "b_output"));
  EXPECT_EQ(g[1].name(), "b");
  EXPECT_EQ(g["a_output"].name(), "a");
  EXPECT_THROW(g[2], Error);
  EXPECT_THROW(g["c_output"], Error);
}

TEST(SymbolInternals, ListsEveryOutputInOrder) {
  Symbol net = Op("FullyConnected", {Variable("data")}, {{"num_hidden", 2}}, "fc");
  net = Op("Activation", {net}, {{"act_type", "relu"}}, "act");
  EXPECT_THAT(net.GetInternals().ListOutputs(),
              ElementsAre("data", "fc_weight", "fc_bias", "fc_output", "act_output"));
  Symbol fc = net.GetInternals()["fc_output"];
  EXPECT_THAT(fc.ListArguments(), ElementsAre("data", "fc_weight", "fc_bias"));
}

TEST(SymbolAttrs, VariableAttributesUseMxnetKeys) {
  Symbol w = Variable("w", {{"lr_mult", "0.5"}, {"shape", "(3,4)"}, {"group", "g1"}});
  EXPECT_EQ(w.GetAttr("__lr_mult__"), "0.5");
  EXPECT_EQ(w.GetAttr("__shape__"), "(3,4)");
  EXPECT_EQ(w.GetAttr("group"), "g1");
  EXPECT_EQ(w.GetAttr("missing"), std::nullopt);
  Symbol y = w * 2.0f;
  EXPECT_EQ(y.ListAttrs().at("w$__lr_mult__"), "0.5");
  // __shape__ feeds shape inference.
  auto shapes = y.InferShape({});
  ASSERT_TRUE(shapes.ok());
  EXPECT_THAT(shapes->outputs, ElementsAre(Shape{3, 4}));
}

TEST(SymbolInferShape, PartialKnowledgeLeavesUnknowns) {
  Symbol net = Op("FullyConnected", {Variable("data")}, {{"num_hidden", 10}}, "fc");
  auto shapes = net.InferShape({{"data", Shape{0, 64}}});
  ASSERT_TRUE(shapes.ok()) << shapes.status();
  EXPECT_THAT(shapes->arguments, ElementsAre(Shape{0, 64}, Shape{10, 64}, Shape{10}));
  EXPECT_THAT(shapes->outputs, ElementsAre(Shape{0, 10}));
  auto none = net.InferShape({});
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->arguments[0].ndim(), 0);
  auto strict = net.InferShape({}, /*require_complete=*/true);
  ASSERT_FALSE(strict.ok());
  EXPECT_THAT(strict.status().message(), HasSubstr("data"));
}

// Shapes flow back through any number of levels: x is known from y
// through 9 activations (forward passes alone carried it back a level per
// pass and stopped after 8).
TEST(SymbolInferShape, ShapesFlowBackThroughManyLevels) {
  Symbol h = Variable("x");
  for (int i = 0; i < 9; ++i)
    h = Op("Activation", {h}, {{"act_type", "relu"}}, "act" + std::to_string(i));
  Symbol net = Op("elemwise_add", {h, Variable("y")}, {}, "add");
  auto shapes = net.InferShape({{"y", Shape{2, 3}}}, /*require_complete=*/true);
  ASSERT_TRUE(shapes.ok()) << shapes.status();
  EXPECT_THAT(shapes->arguments, ElementsAre(Shape{2, 3}, Shape{2, 3}));
}

// More dimensions than the kernels index: an error at inference, naming
// them, not at the first forward (Dropout's only in training).
TEST(SymbolInferShape, MoreDimensionsThanTheKernelsIndexAreRefused) {
  const Shape nine{1, 1, 1, 1, 1, 1, 1, 1, 2};
  const std::map<std::string, Shape> x_only = {{"x", nine}}, both = {{"x", nine}, {"y", {2}}};
  for (const auto& [net, known] :
       {std::pair{Op("sum", {Variable("x")}, {}, "s"), x_only},
        std::pair{Op("broadcast_add", {Variable("x"), Variable("y")}, {}, "b"), both},
        std::pair{Op("Dropout", {Variable("x")}, {}, "d"), x_only}}) {
    auto shapes = net.InferShape(known);
    ASSERT_FALSE(shapes.ok()) << net.ListOutputs()[0];
    EXPECT_THAT(std::string(shapes.status().message()), HasSubstr("input data has 9 dimensions"));
  }
}

// A graph hundreds of thousands of nodes deep is freed without
// recursing a level per node (which overflowed the stack).
TEST(SymbolGraph, AVeryDeepGraphIsFreed) {
  Symbol h = Variable("x");
  for (int i = 0; i < 300000; ++i) h = Op("Activation", {h}, {{"act_type", "relu"}});
  EXPECT_EQ(h.ListArguments().size(), 1u);
  h = Variable("y");  // frees the chain
  EXPECT_EQ(h.ListArguments()[0], "y");
}

// Composing such a graph copies it in one pass (a recursion per level
// overflowed the stack), and shares what the replaced variable does not
// reach.
TEST(SymbolGraph, AVeryDeepGraphIsComposed) {
  Symbol h = Variable("x");
  for (int i = 0; i < 300000; ++i) h = Op("Activation", {h}, {{"act_type", "relu"}});
  Symbol side = Op("Activation", {Variable("z")}, {{"act_type", "relu"}}, "side");
  h = Op("elemwise_add", {h, side}, {}, "sum");
  Symbol composed = h({{"x", Op("Activation", {Variable("w")}, {{"act_type", "tanh"}})}});
  EXPECT_THAT(composed.ListArguments(), ElementsAre("w", "z"));
  EXPECT_THAT(h.ListArguments(), ElementsAre("x", "z"));  // the original is unchanged
}

TEST(SymbolInferShape, InconsistencyNamesOperatorInputAndShapes) {
  Symbol a = Variable("a"), b = Variable("b");
  Symbol c = Op("elemwise_add", {a, b}, {}, "add1");
  auto shapes = c.InferShape({{"a", Shape{2, 3}}, {"b", Shape{3, 2}}});
  ASSERT_FALSE(shapes.ok());
  EXPECT_THAT(shapes.status().message(), HasSubstr("add1"));
  EXPECT_THAT(shapes.status().message(), HasSubstr("(2,3)"));
  EXPECT_THAT(shapes.status().message(), HasSubstr("(3,2)"));

  Symbol fc = Op("FullyConnected", {Variable("data")}, {{"num_hidden", 4}}, "fc");
  auto bad = fc.InferShape({{"data", Shape{2, 3}}, {"fc_weight", Shape{4, 5}}});
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr("fc_weight"));
}

TEST(SymbolInferShape, UnknownNameIsAnError) {
  auto shapes = Variable("x").InferShape({{"y", Shape{1}}});
  ASSERT_FALSE(shapes.ok());
  EXPECT_THAT(shapes.status().message(), HasSubstr("'y' is not an argument"));
}

Symbol SmallNet() {
  Symbol net = Variable("data", {{"lr_mult", "2"}});
  net = Op("FullyConnected", {net}, {{"num_hidden", 8}}, "fc1");
  net = Op("Activation", {net}, {{"act_type", "relu"}}, "relu1");
  return Op("SoftmaxOutput", {net}, {{"grad_scale", 0.5f}}, "out");
}

TEST(SymbolJson, RoundTripKeepsStructureParamsAndAttrs) {
  Symbol net = SmallNet();
  std::string json = net.ToJSON();
  EXPECT_THAT(json, HasSubstr("\"node_row_ptr\""));
  EXPECT_THAT(json, HasSubstr("\"num_hidden\": \"8\""));
  auto loaded = Symbol::FromJSON(json);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->ListArguments(), net.ListArguments());
  EXPECT_EQ(loaded->ListOutputs(), net.ListOutputs());
  EXPECT_EQ(loaded->DebugString(), net.DebugString());
  EXPECT_EQ(loaded->ListAttrs(), net.ListAttrs());
  EXPECT_EQ(loaded->ToJSON(), json);
}

// A symbol file as MXNet 1.x writes it.
constexpr char kMxnet1Json[] = R"({
  "nodes": [
    {"op": "null", "name": "data", "inputs": []},
    {"op": "null", "name": "fc1_weight", "attrs": {"__lr_mult__": "1.0"}, "inputs": []},
    {"op": "null", "name": "fc1_bias", "inputs": []},
    {"op": "FullyConnected", "name": "fc1", "attrs": {"num_hidden": "128"},
     "inputs": [[0, 0, 0], [1, 0, 0], [2, 0, 0]]},
    {"op": "Activation", "name": "relu1", "attrs": {"act_type": "relu"},
     "inputs": [[3, 0, 0]]},
    {"op": "null", "name": "softmax_label", "inputs": []},
    {"op": "SoftmaxOutput", "name": "softmax", "inputs": [[4, 0, 0], [5, 0, 0]]}
  ],
  "arg_nodes": [0, 1, 2, 5],
  "node_row_ptr": [0, 1, 2, 3, 4, 5, 6, 7],
  "heads": [[6, 0, 0]],
  "attrs": {"mxnet_version": ["int", 10500]}
})";

// The same network in the 0.8-era layout ("param" and "attr").
constexpr char kMxnet08Json[] = R"({
  "nodes": [
    {"op": "null", "param": {}, "name": "data", "inputs": [], "backward_source_id": -1},
    {"op": "null", "param": {}, "name": "fc1_weight", "inputs": [], "backward_source_id": -1,
     "attr": {"__lr_mult__": "1.0"}},
    {"op": "null", "param": {}, "name": "fc1_bias", "inputs": [], "backward_source_id": -1},
    {"op": "FullyConnected", "param": {"no_bias": "False", "num_hidden": "128"},
     "name": "fc1", "inputs": [[0, 0], [1, 0], [2, 0]], "backward_source_id": -1},
    {"op": "Activation", "param": {"act_type": "relu"}, "name": "relu1",
     "inputs": [[3, 0]], "backward_source_id": -1},
    {"op": "null", "param": {}, "name": "softmax_label", "inputs": [], "backward_source_id": -1},
    {"op": "SoftmaxOutput", "param": {"grad_scale": "1", "multi_output": "False"},
     "name": "softmax", "inputs": [[4, 0], [5, 0]], "backward_source_id": -1}
  ],
  "arg_nodes": [0, 1, 2, 5],
  "heads": [[6, 0]]
})";

TEST(SymbolJson, ReadsMxnet1xFiles) {
  auto s = Symbol::FromJSON(kMxnet1Json);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_THAT(s->ListArguments(),
              ElementsAre("data", "fc1_weight", "fc1_bias", "softmax_label"));
  EXPECT_THAT(s->ListOutputs(), ElementsAre("softmax_output"));
  EXPECT_EQ(s->ListAttrs().at("fc1_weight$__lr_mult__"), "1.0");
  auto shapes = s->InferShape({{"data", Shape{5, 20}}});
  ASSERT_TRUE(shapes.ok());
  EXPECT_EQ(shapes->arguments[1], (Shape{128, 20}));
}

TEST(SymbolJson, ReadsMxnet08Files) {
  auto s = Symbol::FromJSON(kMxnet08Json);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_THAT(s->ListArguments(),
              ElementsAre("data", "fc1_weight", "fc1_bias", "softmax_label"));
  auto again = Symbol::FromJSON(s->ToJSON());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->DebugString(), s->DebugString());
}

// Operators by MXNet's other names (0.8's _Plus, _MulScalar, Softmax): a
// ResNet's shortcut add in an 0.8 file was an unknown operator. They are
// saved under mx's names.
TEST(SymbolJson, ReadsMxnetAliasesOfOperators) {
  auto s = Symbol::FromJSON(R"({
  "nodes": [
    {"op": "null", "param": {}, "name": "a", "inputs": [], "backward_source_id": -1},
    {"op": "null", "param": {}, "name": "b", "inputs": [], "backward_source_id": -1},
    {"op": "_Plus", "param": {}, "name": "_plus0", "inputs": [[0, 0], [1, 0]],
     "backward_source_id": -1},
    {"op": "_MulScalar", "param": {"scalar": "2"}, "name": "_mulscalar0",
     "inputs": [[2, 0]], "backward_source_id": -1},
    {"op": "null", "param": {}, "name": "softmax_label", "inputs": [], "backward_source_id": -1},
    {"op": "Softmax", "param": {"grad_scale": "1"}, "name": "softmax",
     "inputs": [[3, 0], [4, 0]], "backward_source_id": -1}
  ],
  "arg_nodes": [0, 1, 4],
  "heads": [[5, 0]]
})");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_THAT(s->ListArguments(), ElementsAre("a", "b", "softmax_label"));
  auto exec = Executor::SimpleBind(*s, cpu(), {{"a", Shape{1, 2}}, {"b", Shape{1, 2}}});
  ASSERT_TRUE(exec.ok()) << exec.status();
  NDArray((*exec)->arg_dict().at("a")).Assign(FromVector({1, 0}, {1, 2}));
  NDArray((*exec)->arg_dict().at("b")).Assign(FromVector({0, -1}, {1, 2}));
  (*exec)->Forward(false);
  // softmax(2 * (a + b)) = softmax(2, -2)
  const std::vector<float> out = (*exec)->outputs()[0].ToVector();
  ASSERT_EQ(out.size(), 2u);
  EXPECT_NEAR(out[0], 1 / (1 + std::exp(-4.0f)), 1e-6);
  const std::string json = s->ToJSON();
  EXPECT_THAT(json, HasSubstr("\"elemwise_add\""));
  EXPECT_THAT(json, HasSubstr("\"SoftmaxOutput\""));
  EXPECT_THAT(json, Not(HasSubstr("_Plus")));
}

TEST(SymbolJson, BadFilesGiveClearErrors) {
  auto expect_error = [](const std::string& json, const std::string& fragment) {
    auto s = Symbol::FromJSON(json);
    ASSERT_FALSE(s.ok()) << json;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(s.status().message()), HasSubstr(fragment));
  };
  expect_error("{not json", "not valid JSON");
  expect_error(R"({"nodes": []})", "'heads'");
  expect_error(R"({"nodes": [{"op": "Foo", "name": "f", "inputs": []}], "heads": [[0,0,0]]})",
               "unknown operator 'Foo'");
  expect_error(R"({"nodes": [{"op": "null", "name": "x", "inputs": []},
      {"op": "Activation", "name": "a", "attrs": {"act_type": "relu", "colour": "red"},
       "inputs": [[0,0,0]]}], "heads": [[1,0,0]]})",
               "unknown attribute 'colour'");
  // A node that refers to itself or a later node: a cycle.
  expect_error(R"({"nodes": [{"op": "Activation", "name": "a", "attrs": {"act_type": "relu"},
       "inputs": [[0,0,0]]}], "heads": [[0,0,0]]})",
               "not an earlier node");
  expect_error(R"({"nodes": [{"op": "null", "name": "x", "inputs": []},
      {"op": "null", "name": "x", "inputs": []},
      {"op": "elemwise_add", "name": "p", "inputs": [[0,0,0],[1,0,0]]}],
      "heads": [[2,0,0]]})",
               "duplicate argument name");
  expect_error(R"({"nodes": [{"op": "null", "name": "x", "inputs": []},
      {"op": "elemwise_add", "name": "p", "inputs": [[0,0,0]]}], "heads": [[1,0,0]]})",
               "takes 2 inputs but 1");
  expect_error(R"({"nodes": [{"op": "null", "name": "x", "inputs": []}], "heads": [[3,0,0]]})",
               "heads");
  // Concat names its arguments from num_args before the inputs are counted:
  // 10^12 of them was a trillion names.
  for (const char* n : {"1000000000000", "0"}) {
    expect_error(absl::StrCat(R"({"nodes": [{"op": "null", "name": "x", "inputs": []},
        {"op": "Concat", "name": "c", "attrs": {"num_args": ")",
                              n, R"("}, "inputs": [[0,0,0]]}], "heads": [[1,0,0]]})"),
                 absl::StrCat("num_args='", n, "' is invalid: must be from 1 to 65536"));
  }
  // An input nested a million arrays deep: described, not printed (which
  // recursed that deep and overflowed the stack).
  const std::string deep = std::string(1000000, '[') + std::string(1000000, ']');
  expect_error(absl::StrCat(R"({"nodes": [{"op": "null", "name": "x", "inputs": []}], "heads": [)",
                            deep, "]}"),
               "an input must be [node, output(, version)], got an array of 1 element(s)");
  // The same in a node's inputs, which were copied (a copy recursed as deep).
  expect_error(absl::StrCat(R"({"nodes": [{"op": "null", "name": "x", "inputs": [)", deep,
                            R"(]}], "heads": [[0,0,0]]})"),
               "an input must be [node, output(, version)]");
}

TEST(SymbolJson, SaveAndLoadFile) {
  std::string path = ::testing::TempDir() + "/net-symbol.json";
  ASSERT_TRUE(SmallNet().Save(path).ok());
  auto s = Symbol::Load(path);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->ListArguments(), SmallNet().ListArguments());
  auto missing = Symbol::Load(path + ".nope");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
}

TEST(SymbolGraphviz, DotTextWithShapes) {
  std::string dot = SmallNet().ToGraphviz({{"data", Shape{4, 16}}});
  EXPECT_THAT(dot, HasSubstr("digraph mx {"));
  EXPECT_THAT(dot, HasSubstr("fc1\\nFullyConnected\\nnum_hidden=8"));
  EXPECT_THAT(dot, HasSubstr("[label=\"(4,8)\"]"));    // fc1 -> relu1
  EXPECT_THAT(dot, HasSubstr("[label=\"(4,16)\"]"));   // data -> fc1
}

}  // namespace
}  // namespace mx
