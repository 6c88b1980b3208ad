// Bulks (graph/executor.h): consecutive graph nodes pushed as one engine
// operation. GPU executors bulk by default; these tests bulk on CPU
// contexts (MX_EXEC_BULK_CPU), which run the same code, and check that
// bulked and unbulked executors give the same bits, that bulks stop at
// copies between contexts and at the set size, and that an error inside a
// bulk reaches the waiter.
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "graph/executor.h"
#include "graph/op.h"
#include "graph/symbol.h"
#include "gtest/gtest.h"
#include "ndarray/ndarray.h"
#include "tests/graph/sgd_steps.h"

namespace mx {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Copies its input, and throws when the input's first element is negative:
// an operator that fails when it runs, not when it is bound.
OpDef FailOnNegative() {
  OpDef def;
  def.name = "_TestFailOnNegative";
  def.infer_shape = [](const ParsedParams&, ShapeList* in, ShapeList* out, ShapeList*) {
    (*out)[0] = (*in)[0];
    return absl::OkStatus();
  };
  def.forward = [](const OpContext&, const ParsedParams&, const std::vector<TBlob>& in,
                   const std::vector<OpReq>&, const std::vector<TBlob>& out,
                   const std::vector<TBlob>&) {
    if (in[0].data[0] < 0) throw Error(absl::InvalidArgumentError("check: a negative input"));
    std::copy(in[0].data, in[0].data + in[0].shape.Size(), out[0].data);
  };
  def.backward = [](const OpContext&, const ParsedParams&, const std::vector<TBlob>& out_grad,
                    const std::vector<TBlob>&, const std::vector<TBlob>&, const std::vector<OpReq>&,
                    const std::vector<TBlob>& in_grad, const std::vector<TBlob>&) {
    if (in_grad[0].data == nullptr) return;
    std::copy(out_grad[0].data, out_grad[0].data + out_grad[0].shape.Size(), in_grad[0].data);
  };
  return def;
}
MX_REGISTER_OP(FailOnNegative());

// Sets MX_EXEC_BULK_CPU for the executors bound in its scope.
class BulkCpu {
 public:
  explicit BulkCpu(const char* value) { setenv("MX_EXEC_BULK_CPU", value, 1); }
  ~BulkCpu() { unsetenv("MX_EXEC_BULK_CPU"); }
};

Symbol Fc(const Symbol& in, int hidden, const std::string& name) {
  return Op("FullyConnected", {in}, {{"num_hidden", hidden}}, name);
}

// Eight nodes, with random draws (Dropout) and auxiliary states
// (BatchNorm), so that bulks must keep each node's seed and updates.
Symbol Net() {
  Symbol x = Op("_TestFailOnNegative", {Variable("data")}, {}, "check");
  x = Fc(x, 32, "fc1");
  x = Op("BatchNorm", {x}, {{"fix_gamma", false}}, "bn");
  x = Op("Activation", {x}, {{"act_type", "relu"}}, "relu");
  x = Op("Dropout", {x}, {{"p", 0.3f}}, "drop");
  x = Op("Activation", {Fc(x, 16, "fc2")}, {{"act_type", "tanh"}}, "tanh");
  return Op("SoftmaxOutput", {Fc(x, 10, "fc3")}, {}, "softmax");
}

const Shape kData{8, 20};

std::vector<float> Random(int64_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = u(gen);
  return v;
}

std::unique_ptr<Executor> BindNet(const Symbol& net,
                                  const std::map<std::string, Context>& group2ctx = {}) {
  auto exec = Executor::SimpleBind(net, cpu(), {{"data", kData}, {"softmax_label", Shape{8}}},
                                   GradReq::kWrite, {}, group2ctx);
  EXPECT_TRUE(exec.ok()) << exec.status();
  if (!exec.ok()) return nullptr;
  uint32_t seed = 1;
  for (const auto& [name, array] : (*exec)->arg_dict()) {
    NDArray a = array;
    if (name == "softmax_label") {
      a.Assign({0, 3, 9, 1, 1, 5, 7, 2});
    } else if (name == "bn_gamma") {
      a.Assign(1.0f);
    } else {
      std::vector<float> v = Random(a.size(), seed++);
      for (float& x : v) x = name == "data" ? x : 0.6f * x - 0.3f;
      a.Assign(v);
    }
  }
  return *std::move(exec);
}

// SgdSteps with the same Dropout masks for every executor.
std::map<std::string, std::vector<float>> Train(Executor* exec) {
  mx::srand(42);
  return SgdSteps(exec, 3);
}

// The names of the engine operations of one training Forward and Backward.
std::vector<std::string> StepOperations(Executor* exec) {
  WaitAll();
  Engine::Get()->StartTrace();
  exec->Forward(true);
  exec->Backward();
  WaitAll();
  std::vector<std::string> names;
  for (const TraceEvent& e : Engine::Get()->StopTrace()) {
    // Backward zero-fills gradients nobody writes (the label's) beside the
    // chain, in no fixed order.
    if (e.name != "Assign(scalar)") names.push_back(e.name);
  }
  return names;
}

TEST(ExecutorBulks, BulkedCpuNodesGiveTheSameBitsInFewerOperations) {
  std::map<std::string, std::vector<float>> want;
  {
    std::unique_ptr<Executor> exec = BindNet(Net());
    ASSERT_NE(exec, nullptr);
    want = Train(exec.get());
    EXPECT_EQ(StepOperations(exec.get()).size(), 18u);  // one per node, each way
  }
  BulkCpu four("4");
  std::unique_ptr<Executor> exec = BindNet(Net());
  ASSERT_NE(exec, nullptr);
  std::map<std::string, std::vector<float>> got = Train(exec.get());
  ASSERT_EQ(got.size(), want.size());
  for (const auto& [name, values] : want) EXPECT_EQ(got[name], values) << name;
  EXPECT_THAT(StepOperations(exec.get()),
              ElementsAre("bulk(check .. relu)", "bulk(drop .. fc3)", "softmax",
                          "bulk(softmax_backward .. fc2_backward)",
                          "bulk(drop_backward .. fc1_backward)", "check_backward"));
}

TEST(ExecutorBulks, BulksStopAtCopiesBetweenContexts) {
  Symbol net;
  {
    AttrScope front({{"ctx_group", "front"}});
    Symbol x = Op("_TestFailOnNegative", {Variable("data")}, {}, "check");
    net = Op("Activation", {Fc(x, 16, "fc1")}, {{"act_type", "relu"}}, "relu");
  }
  net = Op("SoftmaxOutput", {Fc(net, 10, "fc2")}, {}, "softmax");
  const std::map<std::string, Context> group2ctx = {{"front", cpu(1)}};
  std::map<std::string, std::vector<float>> want;
  {
    std::unique_ptr<Executor> exec = BindNet(net, group2ctx);
    ASSERT_NE(exec, nullptr);
    want = Train(exec.get());
  }
  BulkCpu many("15");
  std::unique_ptr<Executor> exec = BindNet(net, group2ctx);
  ASSERT_NE(exec, nullptr);
  std::map<std::string, std::vector<float>> got = Train(exec.get());
  for (const auto& [name, values] : want) EXPECT_EQ(got[name], values) << name;
  EXPECT_THAT(StepOperations(exec.get()),
              ElementsAre("bulk(check .. relu)", "Copy", "bulk(fc2 .. softmax)",
                          "bulk(softmax_backward .. fc2_backward)", "Copy",
                          "bulk(relu_backward .. check_backward)"));
}

// The error of the bulk's first node fails the bulk, and the engine
// carries it to what depends on it, as it does for single nodes.
TEST(ExecutorBulks, AnErrorInsideABulkReachesItsWaiters) {
  BulkCpu many("15");
  std::unique_ptr<Executor> exec = BindNet(Net());
  ASSERT_NE(exec, nullptr);
  NDArray data = exec->arg_dict().at("data");
  std::vector<float> bad = data.ToVector();
  bad[0] = -1;
  data.Assign(bad);
  exec->Forward(true);
  exec->Backward();
  for (const NDArray& waited : {exec->outputs()[0], exec->grad_dict().at("fc1_weight")}) {
    try {
      waited.WaitToRead();
      ADD_FAILURE() << "no error reached the waiter";
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("check: a negative input"));
    }
  }
}

// A failed step does not break the executor: once its caller has been told
// of the error, the next steps run as on a fresh executor (the failed step
// changed no weight or auxiliary state).
TEST(ExecutorBulks, AnExecutorTrainsOnAfterAFailedStep) {
  for (const char* size : {"1", "15"}) {
    BulkCpu bulk(size);
    std::map<std::string, std::vector<float>> want;
    {
      std::unique_ptr<Executor> fresh = BindNet(Net());
      ASSERT_NE(fresh, nullptr);
      want = Train(fresh.get());
    }
    std::unique_ptr<Executor> exec = BindNet(Net());
    ASSERT_NE(exec, nullptr);
    NDArray data = exec->arg_dict().at("data");
    const std::vector<float> good = data.ToVector();
    std::vector<float> bad = good;
    bad[0] = -1;
    data.Assign(bad);
    exec->Forward(true);
    exec->Backward();
    EXPECT_THROW(exec->outputs()[0].WaitToRead(), Error) << size;
    data.Assign(good);
    std::map<std::string, std::vector<float>> got = Train(exec.get());
    ASSERT_EQ(got.size(), want.size()) << size;
    for (const auto& [name, values] : want) EXPECT_EQ(got[name], values) << name << ", " << size;
  }
}

TEST(ExecutorBulks, AMonitorSeesEveryNodeOfABulk) {
  BulkCpu many("15");
  std::unique_ptr<Executor> exec = BindNet(Net());
  ASSERT_NE(exec, nullptr);
  std::vector<std::string> seen;
  exec->SetMonitorCallback([&](const std::string& name, const NDArray&) { seen.push_back(name); });
  exec->Forward(true);
  EXPECT_THAT(seen, ElementsAre("check_output", "fc1_output", "bn_output", "bn_mean", "bn_var",
                                "relu_output", "drop_output", "drop_mask", "fc2_output",
                                "tanh_output", "fc3_output", "softmax_output"));
}

TEST(ExecutorBulks, ABulkSizeOutsideItsRangeIsAnErrorNamingTheVariable) {
  for (const char* value : {"0", "1001", "many"}) {
    BulkCpu bad(value);
    auto exec = Executor::SimpleBind(Net(), cpu(), {{"data", kData}});
    ASSERT_FALSE(exec.ok()) << value;
    EXPECT_THAT(exec.status().message(),
                HasSubstr(absl::StrCat("MX_EXEC_BULK_CPU=", value, ": must be a whole number")));
  }
}

}  // namespace
}  // namespace mx
