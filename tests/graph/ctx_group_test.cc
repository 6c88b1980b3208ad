// Symbol attributes that act: ctx_group places parts of a graph on other
// contexts through Executor::Bind's group2ctx (MXNet's group2ctx), and
// lr_mult / wd_mult reach the optimizer; as MXNet's 0.8-era files ("attr"
// beside "param", weight_lr_mult on operators, no auxiliary states listed)
// and 1.x files ("__ctx_group__") carry them.
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "graph/executor.h"
#include "graph/symbol.h"
#include "ndarray/ndarray.h"

namespace mx {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// MXNet's own 0.8-era test file (tests/python/unittest/save_000800.json).
constexpr char kMxnet08File[] = "tests/testdata/mxnet_save_000800.json";

// The network of MXNet's test_load_000800, built with attribute scopes.
Symbol StagedNet() {
  Symbol act1;
  {
    AttrScope stage1({{"ctx_group", "stage1"}});
    Symbol data = Variable("data", {{"lr_mult", "0.2"}});
    Symbol weight = Variable("fc1_weight", {{"lr_mult", "1.2"}});
    Symbol fc1 = Op("FullyConnected", {data, {"weight", weight}},
                    {{"num_hidden", 128}, {"wd_mult", "0.3"}}, "fc1");
    act1 = Op("Activation", {fc1}, {{"act_type", "relu"}}, "relu1");
  }
  AttrScope stage2({{"ctx_group", "stage2"}});
  Symbol fc2 = Op("FullyConnected", {act1}, {{"num_hidden", 64}, {"lr_mult", "0.01"}}, "fc2");
  Symbol act2 = Op("Activation", {fc2}, {{"act_type", "relu"}}, "relu2");
  Symbol fc3 = Op("FullyConnected", {act2}, {{"num_hidden", 10}}, "fc3");
  Symbol bn = Op("BatchNorm", {fc3}, {}, "batchnorm0");
  return Op("SoftmaxOutput", {bn}, {}, "softmax");
}

const std::map<std::string, Context> kStages = {{"stage1", cpu(1)}, {"stage2", cpu(2)}};

void ExpectNear(const NDArray& got, const NDArray& want, const std::string& what) {
  ASSERT_EQ(got.shape(), want.shape()) << what;
  std::vector<float> g = got.ToVector(), w = want.ToVector();
  for (size_t i = 0; i < g.size(); ++i) {
    ASSERT_NEAR(g[i], w[i], 1e-5f * (1 + std::fabs(w[i]))) << what << " at " << i;
  }
}

TEST(SymbolAttributes, Mxnet08FileLoadsWithItsAttributesUpgraded) {
  absl::StatusOr<Symbol> loaded = Symbol::Load(kMxnet08File);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->ListArguments(), StagedNet().ListArguments());
  // Not listed before 0.9: added as MXNet's loader adds them.
  EXPECT_THAT(loaded->ListAuxiliaryStates(),
              ElementsAre("batchnorm0_moving_mean", "batchnorm0_moving_var"));
  const std::map<std::string, std::string> attrs = loaded->ListAttrs();
  EXPECT_EQ(attrs.at("data$__ctx_group__"), "stage1");
  EXPECT_EQ(attrs.at("data$__lr_mult__"), "0.2");
  // fc1's weight_lr_mult is its weight's lr_mult.
  EXPECT_EQ(attrs.at("fc1_weight$__lr_mult__"), "1.2");
  EXPECT_FALSE(attrs.count("fc1$weight_lr_mult"));
  EXPECT_EQ(attrs.at("fc1_weight$__wd_mult__"), "0.3");
  EXPECT_EQ(attrs.at("fc2_bias$__lr_mult__"), "0.01");
  EXPECT_EQ(attrs.at("batchnorm0_moving_var$__ctx_group__"), "stage2");
  EXPECT_EQ(attrs.at("softmax$__ctx_group__"), "stage2");
}

// MXNet's check: every "__key__" attribute of the built network is in the
// loaded one with the same value.
TEST(SymbolAttributes, Mxnet08FileHasTheAttributesOfTheNetworkBuiltWithScopes) {
  absl::StatusOr<Symbol> loaded = Symbol::Load(kMxnet08File);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const std::map<std::string, std::string> built = StagedNet().ListAttrs();
  const std::map<std::string, std::string> read = loaded->ListAttrs();
  int checked = 0;
  for (const auto& [key, value] : built) {
    const std::string attr = key.substr(key.find('$') + 1);
    if (attr.rfind("__", 0) != 0) continue;
    ASSERT_TRUE(read.count(key)) << key;
    EXPECT_EQ(read.at(key), value) << key;
    ++checked;
  }
  EXPECT_GE(checked, 25);
  // Saved and loaded again (1.x layout), the attributes stay.
  absl::StatusOr<Symbol> again = Symbol::FromJSON(loaded->ToJSON());
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->ListAttrs(), read);
  EXPECT_EQ(again->ListAuxiliaryStates(), loaded->ListAuxiliaryStates());
}

TEST(SymbolAttributes, OperatorAttributesReachTheVariablesItCreates) {
  Symbol fc = Op("FullyConnected", {Variable("x")}, {{"num_hidden", 2}, {"lr_mult", "0.5"}}, "fc");
  const std::map<std::string, std::string> attrs = fc.ListAttrs();
  EXPECT_EQ(attrs.at("fc$__lr_mult__"), "0.5");
  EXPECT_EQ(attrs.at("fc_weight$__lr_mult__"), "0.5");
  EXPECT_EQ(attrs.at("fc_bias$__lr_mult__"), "0.5");
  EXPECT_FALSE(attrs.count("x$__lr_mult__"));  // given, not created
  // Scopes nest; the inner one wins.
  AttrScope outer({{"ctx_group", "a"}, {"mood", "calm"}});
  AttrScope inner({{"ctx_group", "b"}});
  Symbol v = Variable("v");
  EXPECT_EQ(v.GetAttr("__ctx_group__"), "b");
  EXPECT_EQ(v.GetAttr("mood"), "calm");
}

TEST(SymbolAttributes, UnknownOperatorKeysOutsideAttrAreStillRefused) {
  const std::string json = R"({"nodes": [
    {"op": "null", "name": "x", "inputs": []},
    {"op": "Activation", "name": "a", "param": {"act_type": "relu", "colour": "red"},
     "inputs": [[0, 0]]}], "heads": [[1, 0]]})";
  absl::StatusOr<Symbol> s = Symbol::FromJSON(json);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.status().message(), HasSubstr("unknown attribute 'colour' for operator Activation"));
}

// Binds `net` on cpu(0), with group2ctx when given, with the same
// parameters and inputs, and runs one training step.
std::unique_ptr<Executor> Step(const Symbol& net, const std::map<std::string, Context>& group2ctx) {
  auto exec = Executor::SimpleBind(net, cpu(), {{"data", Shape{4, 200}}}, GradReq::kWrite, {},
                                   group2ctx);
  EXPECT_TRUE(exec.ok()) << exec.status();
  if (!exec.ok()) return nullptr;
  srand(7);
  for (const auto& [name, a] : (*exec)->arg_dict()) {
    NDArray array = a;
    if (name == "softmax_label") {
      array.Assign(std::vector<float>{1, 3, 5, 7});
    } else {
      array.Assign(RandomUniform(-0.5f, 0.5f, a.shape()));
    }
  }
  for (const auto& [name, a] : (*exec)->aux_dict()) {
    NDArray array = a;
    array.Assign(name.find("var") != std::string::npos ? 1.0f : 0.0f);
  }
  (*exec)->Forward(true);
  (*exec)->Backward();
  return *std::move(exec);
}

TEST(GroupToContext, StagesRunOnTheirContextsAndComputeWhatOneContextDoes) {
  for (const bool from_file : {false, true}) {
    SCOPED_TRACE(from_file ? "loaded from MXNet's 0.8 file" : "built with AttrScope");
    Symbol net = from_file ? *Symbol::Load(kMxnet08File) : StagedNet();
    std::unique_ptr<Executor> one = Step(net, {});
    std::unique_ptr<Executor> staged = Step(net, kStages);
    ASSERT_TRUE(one && staged);
    EXPECT_EQ(staged->arg_dict().at("data").context(), cpu(1));
    EXPECT_EQ(staged->arg_dict().at("fc1_bias").context(), cpu(1));
    EXPECT_EQ(staged->grad_dict().at("fc1_weight").context(), cpu(1));
    EXPECT_EQ(staged->arg_dict().at("fc2_weight").context(), cpu(2));
    EXPECT_EQ(staged->aux_dict().at("batchnorm0_moving_mean").context(), cpu(2));
    EXPECT_EQ(staged->outputs()[0].context(), cpu(2));
    EXPECT_EQ(one->outputs()[0].context(), cpu(0));
    ExpectNear(staged->outputs()[0], one->outputs()[0], "output");
    for (const auto& [name, g] : one->grad_dict()) {
      ExpectNear(staged->grad_dict().at(name), g, "gradient of " + name);
    }
    for (const auto& [name, a] : one->aux_dict()) {
      ExpectNear(staged->aux_dict().at(name), a, "auxiliary state " + name);
    }
  }
}

TEST(GroupToContext, AGradientReturningFromSeveralContextsIsSummed) {
  Symbol x, y1;
  {
    AttrScope stage1({{"ctx_group", "stage1"}});
    x = Variable("x");
    y1 = x * 2.0f;
  }
  AttrScope stage2({{"ctx_group", "stage2"}});
  Symbol out = y1 + x * 3.0f;  // x and y1 are copied to cpu(2)
  for (GradReq req : {GradReq::kWrite, GradReq::kAdd}) {
    NDArray gx = Zeros({3}, cpu(1));
    auto exec = Executor::Bind(out, cpu(), {{"x", FromVector({1, 2, 3}).Copy(cpu(1))}},
                               {{"x", gx}}, {{"x", req}}, {}, kStages);
    ASSERT_TRUE(exec.ok()) << exec.status();
    for (int step = 0; step < 2; ++step) {
      (*exec)->Forward(true);
      (*exec)->Backward({FromVector({1, 10, 100}).Copy(cpu(2))});
    }
    EXPECT_EQ((*exec)->outputs()[0].context(), cpu(2));
    EXPECT_THAT((*exec)->outputs()[0].ToVector(), ElementsAre(5, 10, 15));
    const float times = req == GradReq::kAdd ? 2 : 1;  // kAdd keeps adding
    EXPECT_THAT(gx.ToVector(), ElementsAre(5 * times, 50 * times, 500 * times));
  }
}

TEST(GroupToContext, ArraysWhereTheirGroupDoesNotPlaceThemAreRefused) {
  auto exec = Executor::SimpleBind(StagedNet(), cpu(), {{"data", Shape{4, 200}}});
  ASSERT_TRUE(exec.ok()) << exec.status();
  // Arrays all on cpu(0), but the groups place them on cpu(1) and cpu(2).
  auto staged = Executor::Bind(StagedNet(), cpu(), (*exec)->arg_dict(), {}, {},
                               (*exec)->aux_dict(), kStages);
  ASSERT_FALSE(staged.ok());
  EXPECT_THAT(staged.status().message(),
              HasSubstr("argument 'data' is on cpu(0) but its ctx_group 'stage1' places it on "
                        "cpu(1)"));
  // An ungrouped variable lives with the operator that reads it.
  Symbol w = Variable("w");
  Symbol y;
  {
    AttrScope stage2({{"ctx_group", "stage2"}});
    y = Variable("x", {}) * w;
  }
  auto ungrouped = Executor::Bind(y, cpu(), {{"x", Ones({2}, cpu(2))}, {"w", Ones({2})}}, {}, {},
                                  {}, kStages);
  ASSERT_FALSE(ungrouped.ok());
  EXPECT_THAT(ungrouped.status().message(),
              HasSubstr("argument 'w' is on cpu(0) but the operator reading it runs on cpu(2)"));
}

TEST(GroupToContext, AnAuxiliaryStateMustLiveWithTheOperatorThatUpdatesIt) {
  Symbol mean;
  {
    AttrScope stage1({{"ctx_group", "stage1"}});
    mean = Variable("mean");
  }
  AttrScope stage2({{"ctx_group", "stage2"}});
  Symbol bn = Op("BatchNorm", {Variable("data"), {"moving_mean", mean}}, {}, "bn");
  auto exec = Executor::SimpleBind(bn, cpu(), {{"data", Shape{2, 3}}}, GradReq::kNull, {}, kStages);
  ASSERT_FALSE(exec.ok());
  EXPECT_THAT(exec.status().message(),
              HasSubstr("auxiliary state 'mean' is on cpu(1) but operator bn, which updates it, "
                        "runs on cpu(2)"));
}

TEST(GroupToContext, GroupsMissingFromTheMapRunOnTheBindContext) {
  auto exec = Executor::SimpleBind(StagedNet(), cpu(), {{"data", Shape{4, 200}}}, GradReq::kWrite,
                                   {}, {{"stage2", cpu(2)}});
  ASSERT_TRUE(exec.ok()) << exec.status();
  EXPECT_EQ((*exec)->arg_dict().at("data").context(), cpu(0));
  EXPECT_EQ((*exec)->arg_dict().at("fc3_weight").context(), cpu(2));
  // Reshape keeps every array where it was.
  auto bigger = (*exec)->Reshape({{"data", Shape{8, 200}}, {"softmax_label", Shape{8}}});
  ASSERT_TRUE(bigger.ok()) << bigger.status();
  EXPECT_EQ((*bigger)->arg_dict().at("data").context(), cpu(0));
  EXPECT_EQ((*bigger)->arg_dict().at("fc3_weight").context(), cpu(2));
  EXPECT_EQ((*bigger)->outputs()[0].shape(), (Shape{8, 10}));
}

}  // namespace
}  // namespace mx
