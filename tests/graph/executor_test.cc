// Executor: bind checks, forward/backward values, gradient requests, head
// gradients, reshape, the monitor and the memory plan.
#include "graph/executor.h"

#include <cmath>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "graph/symbol.h"
#include "gtest/gtest.h"

namespace mx {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Pointwise;
using ::testing::FloatNear;

// The MLP data -> fc1 (hidden1) -> relu -> fc2 (hidden2) -> relu -> fc3 (10)
// -> softmax.
Symbol Mlp(int hidden1 = 128, int hidden2 = 64) {
  Symbol net = Variable("data");
  net = Op("FullyConnected", {net}, {{"num_hidden", hidden1}}, "fc1");
  net = Op("Activation", {net}, {{"act_type", "relu"}}, "relu1");
  net = Op("FullyConnected", {net}, {{"num_hidden", hidden2}}, "fc2");
  net = Op("Activation", {net}, {{"act_type", "relu"}}, "relu2");
  net = Op("FullyConnected", {net}, {{"num_hidden", 10}}, "fc3");
  return Op("SoftmaxOutput", {net}, {}, "softmax");
}

void Randomize(const std::map<std::string, NDArray>& arrays, uint64_t seed) {
  srand(seed);
  for (const auto& [name, a] : arrays) {
    if (name.find("label") != std::string::npos) continue;
    NDArray x = a;
    SampleUniform(-0.5f, 0.5f, &x);
  }
}

// Head gradients MXNet's way: an output listed twice gets the sum of its
// two head gradients (the second replaced the first), and a variable among
// the outputs gets its head gradient added to what flows back to it (it got
// none).
TEST(ExecutorHeads, AnOutputListedTwiceSumsItsHeadGradients) {
  Symbol x = Variable("x");
  Symbol y = x * 2.0f;
  auto e = Executor::SimpleBind(Group({y, y}), cpu(), {{"x", {3}}});
  ASSERT_TRUE(e.ok()) << e.status();
  (*e)->Forward(true);
  (*e)->Backward({Full({3}, 1.0f), Full({3}, 3.0f)});
  EXPECT_THAT((*e)->grad_dict().at("x").ToVector(), ElementsAre(8, 8, 8));
}

TEST(ExecutorHeads, AVariableAmongTheOutputsGetsItsHeadGradient) {
  Symbol x = Variable("x");
  for (GradReq req : {GradReq::kWrite, GradReq::kAdd}) {
    auto e = Executor::SimpleBind(Group({x * 2.0f, x}), cpu(), {{"x", {2}}}, req);
    ASSERT_TRUE(e.ok()) << e.status();
    NDArray((*e)->grad_dict().at("x")).Assign(10.0f);
    (*e)->Forward(true);
    (*e)->Backward({Full({2}, 1.0f), Full({2}, 5.0f)});
    const float want = req == GradReq::kAdd ? 17 : 7;
    EXPECT_THAT((*e)->grad_dict().at("x").ToVector(), ElementsAre(want, want));
  }
}

// Two variables of one name would share an array and a gradient; bind
// refuses them, naming the name (x * x through two Variable("x") had the
// gradient x, not 2x).
TEST(ExecutorBind, TwoVariablesOfOneNameAreRefused) {
  auto e = Executor::SimpleBind(Variable("x") * Variable("x"), cpu(), {{"x", {3}}});
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(e.status().message()), HasSubstr("two variables are named 'x'"));
  // One variable used twice is fine: its gradient is 2x.
  Symbol x = Variable("x");
  auto ok = Executor::SimpleBind(x * x, cpu(), {{"x", {3}}});
  ASSERT_TRUE(ok.ok()) << ok.status();
  NDArray((*ok)->arg_dict().at("x")).Assign(std::vector<float>{1, 2, 3});
  (*ok)->Forward(true);
  (*ok)->Backward({Ones({3})});
  EXPECT_THAT((*ok)->grad_dict().at("x").ToVector(), ElementsAre(2, 4, 6));
}

TEST(ExecutorBind, MissingArgumentIsNamed) {
  Symbol c = Variable("A") * Variable("B");
  auto exec = Executor::Bind(c, cpu(), {{"A", Ones({3})}});
  ASSERT_FALSE(exec.ok());
  EXPECT_EQ(exec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(exec.status().message(), HasSubstr("missing argument 'B'"));
}

TEST(ExecutorBind, UnknownArgumentIsNamed) {
  Symbol c = Variable("A") * Variable("B");
  auto exec = Executor::Bind(c, cpu(), {{"A", Ones({3})}, {"B", Ones({3})}, {"C", Ones({3})}});
  ASSERT_FALSE(exec.ok());
  EXPECT_THAT(exec.status().message(), HasSubstr("'C' is not a"));
}

TEST(ExecutorBind, WrongShapeNamesOperatorAndShapes) {
  Symbol net = Op("FullyConnected", {Variable("data")}, {{"num_hidden", 4}}, "fc");
  auto exec = Executor::Bind(net, cpu(),
                             {{"data", Ones({2, 3})}, {"fc_weight", Ones({4, 5})},
                              {"fc_bias", Ones({4})}});
  ASSERT_FALSE(exec.ok());
  EXPECT_THAT(exec.status().message(), HasSubstr("fc"));
  EXPECT_THAT(exec.status().message(), HasSubstr("(4,5)"));
  EXPECT_THAT(exec.status().message(), HasSubstr("(4,3)"));
}

TEST(ExecutorBind, SimpleBindWithoutEnoughShapesSaysWhatIsMissing) {
  auto exec = Executor::SimpleBind(Mlp(), cpu(), {});
  ASSERT_FALSE(exec.ok());
  EXPECT_THAT(exec.status().message(), HasSubstr("cannot infer"));
  EXPECT_THAT(exec.status().message(), HasSubstr("data"));
}

TEST(ExecutorBind, GradientRequestWithoutArrayIsAnError) {
  Symbol c = Variable("A") + Variable("B");
  auto exec = Executor::Bind(c, cpu(), {{"A", Ones({2})}, {"B", Ones({2})}}, {},
                             {{"A", GradReq::kWrite}});
  ASSERT_FALSE(exec.ok());
  EXPECT_THAT(exec.status().message(), HasSubstr("'A' requests a gradient"));
}

TEST(ExecutorForward, ComposedArithmetic) {
  Symbol a = Variable("a"), b = Variable("b");
  Symbol y = (a + b) * a - 2.0f * b / 4.0f;
  auto exec = Executor::Bind(y, cpu(),
                             {{"a", FromVector({1, 2, 3})}, {"b", FromVector({4, 5, 6})}});
  ASSERT_TRUE(exec.ok()) << exec.status();
  (*exec)->Forward();
  // (a+b)*a - b/2
  EXPECT_THAT((*exec)->outputs()[0].ToVector(), ElementsAre(3, 11.5, 24));
}

TEST(ExecutorBackward, ElementwiseGradients) {
  Symbol a = Variable("a"), b = Variable("b");
  Symbol y = a * b + a;  // dy/da = b + 1, dy/db = a
  NDArray ga = Zeros({3}), gb = Zeros({3});
  auto exec = Executor::Bind(y, cpu(), {{"a", FromVector({1, 2, 3})}, {"b", FromVector({4, 5, 6})}},
                             {{"a", ga}, {"b", gb}});
  ASSERT_TRUE(exec.ok()) << exec.status();
  (*exec)->Forward(true);
  (*exec)->Backward({Ones({3})});
  EXPECT_THAT(ga.ToVector(), ElementsAre(5, 6, 7));
  EXPECT_THAT(gb.ToVector(), ElementsAre(1, 2, 3));
}

TEST(ExecutorBackward, SameVariableUsedTwiceAccumulates) {
  Symbol a = Variable("a");
  Symbol y = a * a;  // 2a
  NDArray ga = Zeros({2});
  auto exec = Executor::Bind(y, cpu(), {{"a", FromVector({3, -1})}}, {{"a", ga}});
  ASSERT_TRUE(exec.ok());
  (*exec)->Forward(true);
  (*exec)->Backward({Ones({2})});
  EXPECT_THAT(ga.ToVector(), ElementsAre(6, -2));
}

TEST(ExecutorBackward, GradReqAddAccumulatesAcrossCalls) {
  Symbol a = Variable("a");
  Symbol y = a * 3.0f;
  NDArray ga = Ones({2});
  auto exec = Executor::Bind(y, cpu(), {{"a", FromVector({1, 2})}}, {{"a", ga}},
                             {{"a", GradReq::kAdd}});
  ASSERT_TRUE(exec.ok());
  for (int i = 0; i < 2; ++i) {
    (*exec)->Forward(true);
    (*exec)->Backward({Ones({2})});
  }
  EXPECT_THAT(ga.ToVector(), ElementsAre(7, 7));
}

TEST(ExecutorBackward, GradReqNullLeavesArrayAlone) {
  Symbol y = Variable("a") * Variable("b");
  NDArray ga = Full({2}, 9), gb = Zeros({2});
  auto exec = Executor::Bind(y, cpu(), {{"a", FromVector({1, 2})}, {"b", FromVector({3, 4})}},
                             {{"a", ga}, {"b", gb}}, {{"a", GradReq::kNull}});
  ASSERT_TRUE(exec.ok());
  (*exec)->Forward(true);
  (*exec)->Backward({Ones({2})});
  EXPECT_THAT(ga.ToVector(), ElementsAre(9, 9));
  EXPECT_THAT(gb.ToVector(), ElementsAre(1, 2));
}

TEST(ExecutorBackward, MissingHeadGradientIsAnError) {
  Symbol y = Variable("a") * 2.0f;
  auto exec = Executor::SimpleBind(y, cpu(), {{"a", Shape{2}}});
  ASSERT_TRUE(exec.ok());
  (*exec)->Forward(true);
  try {
    (*exec)->Backward();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("not a loss"));
  }
  EXPECT_THROW((*exec)->Backward({Ones({3})}), Error);
}

TEST(ExecutorBackward, NeedsTrainingForward) {
  auto exec = Executor::SimpleBind(Mlp(), cpu(), {{"data", Shape{2, 8}}});
  ASSERT_TRUE(exec.ok());
  (*exec)->Forward(false);
  try {
    (*exec)->Backward();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), absl::StatusCode::kFailedPrecondition);
  }
}

// Cross-entropy of the MLP on fixed data, computed by a forward pass.
double MlpLoss(Executor& e) {
  e.Forward(true);
  std::vector<float> p = e.outputs()[0].ToVector();
  std::vector<float> label = e.arg_dict().at("softmax_label").ToVector();
  double loss = 0;
  for (size_t r = 0; r < label.size(); ++r) loss -= std::log(p[r * 10 + static_cast<int>(label[r])]);
  return loss;
}

TEST(ExecutorBackward, MlpGradientMatchesFiniteDifferences) {
  auto exec = Executor::SimpleBind(Mlp(), cpu(), {{"data", Shape{4, 8}}}, GradReq::kWrite,
                                   {{"data", GradReq::kNull}, {"softmax_label", GradReq::kNull}});
  ASSERT_TRUE(exec.ok()) << exec.status();
  Executor& e = **exec;
  Randomize(e.arg_dict(), 7);
  NDArray label = e.arg_dict().at("softmax_label");
  label.Assign(std::vector<float>{1, 3, 0, 9});
  e.Forward(true);
  e.Backward();
  for (const char* name : {"fc1_weight", "fc2_bias", "fc3_weight"}) {
    NDArray w = e.arg_dict().at(name);
    std::vector<float> analytic = e.grad_dict().at(name).ToVector();
    std::vector<float> values = w.ToVector();
    for (size_t k : {size_t{0}, values.size() / 2, values.size() - 1}) {
      const float eps = 1e-2f;
      std::vector<float> v = values;
      v[k] += eps;
      w.Assign(v);
      double up = MlpLoss(e);
      v[k] -= 2 * eps;
      w.Assign(v);
      double down = MlpLoss(e);
      w.Assign(values);
      double numeric = (up - down) / (2 * eps);
      EXPECT_NEAR(analytic[k], numeric, 2e-2 * (1 + std::fabs(numeric))) << name << "[" << k << "]";
    }
  }
}

TEST(ExecutorMemory, MlpPlanIsWellBelowNaive) {
  auto exec = Executor::SimpleBind(Mlp(), cpu(), {{"data", Shape{100, 784}}}, GradReq::kWrite,
                                   {{"data", GradReq::kNull}, {"softmax_label", GradReq::kNull}});
  ASSERT_TRUE(exec.ok());
  Executor::MemoryStats m = (*exec)->memory();
  EXPECT_GT(m.naive_bytes, 0u);
  EXPECT_LT(m.planned_bytes, m.naive_bytes * 3 / 4) << m.planned_bytes << " vs " << m.naive_bytes;
  // Inference reuses even more.
  auto infer = Executor::SimpleBind(Mlp(), cpu(), {{"data", Shape{100, 784}}}, GradReq::kNull);
  ASSERT_TRUE(infer.ok());
  EXPECT_LT((*infer)->memory().planned_bytes, (*infer)->memory().naive_bytes / 2);
}

TEST(ExecutorMemory, LeNetPlanIsWellBelowNaive) {
  const Params pool = {{"pool_type", "max"}, {"kernel", Shape{2, 2}}, {"stride", Shape{2, 2}}};
  Symbol net = Op("Convolution", {Variable("data")}, {{"kernel", Shape{5, 5}}, {"num_filter", 20}});
  net = Op("Pooling", {Op("Activation", {net}, {{"act_type", "relu"}})}, pool);
  net = Op("Convolution", {net}, {{"kernel", Shape{5, 5}}, {"num_filter", 50}});
  net = Op("Pooling", {Op("Activation", {net}, {{"act_type", "relu"}})}, pool);
  net = Op("FullyConnected", {Op("Flatten", {net})}, {{"num_hidden", 500}});
  net = Op("FullyConnected", {Op("Activation", {net}, {{"act_type", "relu"}})}, {{"num_hidden", 10}});
  net = Op("SoftmaxOutput", {net}, {}, "softmax");
  auto train = Executor::SimpleBind(net, cpu(), {{"data", Shape{100, 1, 28, 28}}}, GradReq::kWrite,
                                    {{"data", GradReq::kNull}, {"softmax_label", GradReq::kNull}});
  ASSERT_TRUE(train.ok()) << train.status();
  Executor::MemoryStats m = (*train)->memory();
  EXPECT_LT(m.planned_bytes, m.naive_bytes * 3 / 4) << m.planned_bytes << " vs " << m.naive_bytes;
  auto infer = Executor::SimpleBind(net, cpu(), {{"data", Shape{100, 1, 28, 28}}}, GradReq::kNull);
  ASSERT_TRUE(infer.ok());
  EXPECT_LT((*infer)->memory().planned_bytes, (*infer)->memory().naive_bytes / 2);
}

TEST(ExecutorMemory, PlannedBuffersGiveTheSameResultsAsSeparateOnes) {
  // A chain long enough for buffers to be reused several times.
  Symbol x = Variable("x");
  Symbol y = x;
  for (int i = 0; i < 6; ++i) y = Op("Activation", {y * 1.5f}, {{"act_type", "tanh"}});
  auto exec = Executor::Bind(y, cpu(), {{"x", FromVector({0.1f, -0.2f, 0.3f})}});
  ASSERT_TRUE(exec.ok());
  (*exec)->Forward();
  std::vector<float> want = {0.1f, -0.2f, 0.3f};
  for (int i = 0; i < 6; ++i) {
    for (float& v : want) v = std::tanh(v * 1.5f);
  }
  EXPECT_THAT((*exec)->outputs()[0].ToVector(), Pointwise(FloatNear(1e-6), want));
  EXPECT_LT((*exec)->memory().planned_bytes, (*exec)->memory().naive_bytes);
}

TEST(ExecutorReshape, SharesParametersWithNewBatchSize) {
  auto exec = Executor::SimpleBind(Mlp(), cpu(), {{"data", Shape{4, 8}}});
  ASSERT_TRUE(exec.ok());
  Randomize((*exec)->arg_dict(), 3);
  auto small = (*exec)->Reshape({{"data", Shape{2, 8}}, {"softmax_label", Shape{2}}});
  ASSERT_TRUE(small.ok()) << small.status();
  EXPECT_TRUE((*small)->arg_dict().at("fc1_weight").SharesStorageWith(
      (*exec)->arg_dict().at("fc1_weight")));
  EXPECT_EQ((*small)->outputs()[0].shape(), (Shape{2, 10}));
  // The first two rows agree between the two executors.
  NDArray d = (*small)->arg_dict().at("data");
  d.Assign((*exec)->arg_dict().at("data").Slice(0, 2));
  (*exec)->Forward();
  (*small)->Forward();
  std::vector<float> big = (*exec)->outputs()[0].Slice(0, 2).ToVector();
  EXPECT_THAT((*small)->outputs()[0].ToVector(), Pointwise(FloatNear(1e-6), big));
}

TEST(ExecutorReshape, ParameterShapeChangeIsAnError) {
  Symbol net = Op("FullyConnected", {Variable("data")}, {{"num_hidden", 3}}, "fc");
  auto exec = Executor::SimpleBind(net, cpu(), {{"data", Shape{4, 8}}});
  ASSERT_TRUE(exec.ok());
  auto bad = (*exec)->Reshape({{"data", Shape{4, 9}}});
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr("fc_weight"));
}

TEST(ExecutorMonitor, SeesEveryIntermediateOutput) {
  auto exec = Executor::SimpleBind(Mlp(), cpu(), {{"data", Shape{2, 8}}});
  ASSERT_TRUE(exec.ok());
  std::vector<std::string> seen;
  (*exec)->SetMonitorCallback([&](const std::string& name, const NDArray& a) {
    seen.push_back(name);
    a.WaitToRead();
  });
  (*exec)->Forward();
  EXPECT_THAT(seen, ElementsAre("fc1_output", "relu1_output", "fc2_output", "relu2_output",
                                "fc3_output", "softmax_output"));
}

// Regression: pending operations used the symbol's nodes after the executor
// and the last Symbol handle were gone (a crash in the FullyConnected kernel).
TEST(ExecutorLifetime, PendingWorkOutlivesExecutorAndSymbol) {
  NDArray out;
  for (int i = 0; i < 20; ++i) {
    auto exec = Executor::SimpleBind(Mlp(), cpu(), {{"data", Shape{64, 784}}}, GradReq::kNull);
    ASSERT_TRUE(exec.ok());
    (*exec)->Forward();
    out = (*exec)->outputs()[0];
  }  // executor and symbol destroyed with the forward pass still queued
  std::vector<float> v = out.ToVector();
  EXPECT_FLOAT_EQ(v[0], 0.1f);
}

TEST(ExecutorForward, ReturnsBeforeTheWorkIsDone) {
  // Forward only pushes: the outputs are read through the engine.
  auto exec = Executor::SimpleBind(Mlp(), cpu(), {{"data", Shape{64, 784}}}, GradReq::kNull);
  ASSERT_TRUE(exec.ok());
  std::vector<std::string> order;
  (*exec)->Forward();
  std::vector<float> out = (*exec)->outputs()[0].ToVector();
  EXPECT_FLOAT_EQ(out[0], 0.1f);  // zero weights: uniform over 10 classes
}

}  // namespace
}  // namespace mx

namespace mx {
namespace {

// A second Backward without a Forward between: the forward's values that
// backward reads share memory with gradients computed after their last
// read, so the second gave other gradients, silently (fc3_weight's and
// fc1_weight's both differed). It is an error; the first's gradients stay.
TEST(ExecutorBackward, ASecondBackwardNeedsAForwardBetween) {
  // Widening (64 then 128): a buffer of the second relu's output is free
  // for the first's gradient when backward reaches it.
  auto exec = Executor::SimpleBind(Mlp(64, 128), cpu(), {{"data", Shape{4, 8}}});
  ASSERT_TRUE(exec.ok()) << exec.status();
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1, 1);
  for (const auto& [name, arg] : (*exec)->arg_dict()) {
    NDArray a = arg;
    std::vector<float> v(a.size());
    for (float& f : v) f = u(rng);
    if (name == "softmax_label")
      for (size_t i = 0; i < v.size(); ++i) v[i] = i % 10;
    a.SyncCopyFromCPU(v.data(), v.size());
  }
  (*exec)->Forward(true);
  (*exec)->Backward();
  const std::vector<float> first = (*exec)->grad_dict().at("fc3_weight").ToVector();
  const std::vector<float> first1 = (*exec)->grad_dict().at("fc1_weight").ToVector();
  try {
    (*exec)->Backward();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("one Backward per Forward(is_train=true)"));
  }
  EXPECT_EQ((*exec)->grad_dict().at("fc3_weight").ToVector(), first);
  EXPECT_EQ((*exec)->grad_dict().at("fc1_weight").ToVector(), first1);
  (*exec)->Forward(true);  // and again, the same
  (*exec)->Backward();
  EXPECT_EQ((*exec)->grad_dict().at("fc3_weight").ToVector(), first);
  EXPECT_EQ((*exec)->grad_dict().at("fc1_weight").ToVector(), first1);
}

}  // namespace
}  // namespace mx

namespace mx {
namespace {

// Activation relu keeps NaN forward and backward, as MXNet's relu and
// relu_grad do (it gave 0 and a gradient of 0).
TEST(ExecutorNaN, ReluActivationKeepsNaNForwardAndBackward) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  Symbol y = Op("Activation", {Variable("x")}, {{"act_type", "relu"}}, "relu");
  NDArray x = FromVector({nan, -1, 2}), gx = Zeros({3});
  auto exec = Executor::Bind(y, cpu(), {{"x", x}}, {{"x", gx}});
  ASSERT_TRUE(exec.ok()) << exec.status();
  (*exec)->Forward(true);
  (*exec)->Backward({FromVector({1, 1, 1})});
  const std::vector<float> out = (*exec)->outputs()[0].ToVector(), grad = gx.ToVector();
  EXPECT_TRUE(std::isnan(out[0]));
  EXPECT_EQ(out[1], 0);
  EXPECT_EQ(out[2], 2);
  EXPECT_TRUE(std::isnan(grad[0]));
  EXPECT_EQ(grad[1], 0);
  EXPECT_EQ(grad[2], 1);
}

}  // namespace
}  // namespace mx
